"""HET-XL's two forms of pre-logit noise logits: dense and "W once" (HETXL.md section 4).

Both forms must consume the same standard normals, so every quantity built on them (logit
samples, MC log-probabilities, log-likelihoods and their gradients) is the same up to float
rounding whichever form is chosen. References are written from the formulas: pre-logit noise
eps = shift + V e_R + d * e_N (e_N one scalar per sample in shared-scalar mode), logits
(phi + eps) W + b, probabilities averaged over samples.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from models import heteroscedastic as het
from models.heteroscedastic import logit_distributions

KEY = jax.random.key(0)
BATCH, DIM, CLASSES, FACTORS = 5, 6, 7, 3
DIAG_MODES = ["per_dim", "shared_scalar", None]


def problem(diag_mode, with_shift=True, with_bias=True, seed=1):
    """phi f32[B, D], W f32[D, K], b f32[K] or None, NoiseParameters (diag_mode None: no d)."""
    rng = np.random.default_rng(seed)
    phi = jnp.asarray(rng.normal(size=(BATCH, DIM)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(DIM, CLASSES)) / math.sqrt(DIM), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(CLASSES,)) * 0.3, jnp.float32) if with_bias else None
    factors = jnp.asarray(rng.normal(size=(BATCH, DIM, FACTORS)) * 0.5, jnp.float32)
    diag_scale = jnp.asarray(np.abs(rng.normal(size=(BATCH, DIM))) + 0.1, jnp.float32)
    shift = jnp.asarray(rng.normal(size=(BATCH, DIM)) * 0.2, jnp.float32)
    noise = het.NoiseParameters(
        factors=factors,
        diag_scale=None if diag_mode is None else diag_scale,
        mean_shift=shift if with_shift else None,
        shared_scalar_diag=diag_mode == "shared_scalar",
    )
    return phi, weights, bias, noise


def diag_dim(diag_mode) -> int:
    return {"per_dim": DIM, "shared_scalar": 1, None: 0}[diag_mode]


def both_forms(phi, weights, noise, bias):
    dense = het.prelogit_noise_logits(phi, weights, noise, bias, form="dense")
    w_once = het.prelogit_noise_logits(phi, weights, noise, bias, form="w_once")
    assert isinstance(dense, het.PrelogitDistribution)
    assert isinstance(w_once, het.LogitDistribution)
    return dense, w_once


def reference_logits(phi, weights, bias, noise, diag_mode, sample_ids, share):
    """float64 (phi + eps_s) W + b, f32[S, B, K], on the draws of standard_normal_draws."""
    factor_draws, diag_draws = het.standard_normal_draws(
        KEY, sample_ids, BATCH, FACTORS, diag_dim(diag_mode), share
    )
    factor_draws = np.broadcast_to(
        np.asarray(factor_draws, np.float64), (len(sample_ids), BATCH, FACTORS)
    )
    eps = np.einsum("bdr,sbr->sbd", np.asarray(noise.factors, np.float64), factor_draws)
    if diag_mode is not None:
        diag_draws = np.asarray(diag_draws, np.float64)  # [S, B or 1, D or 1]
        eps = eps + np.asarray(noise.diag_scale, np.float64) * diag_draws
    if noise.mean_shift is not None:
        eps = eps + np.asarray(noise.mean_shift, np.float64)
    logits = (np.asarray(phi, np.float64) + eps) @ np.asarray(weights, np.float64)
    return logits if bias is None else logits + np.asarray(bias, np.float64)


def reference_mean(phi, weights, bias, noise):
    """float64 noise-free logits (phi + shift) W + b, f32[B, K]."""
    shifted = np.asarray(phi, np.float64)
    if noise.mean_shift is not None:
        shifted = shifted + np.asarray(noise.mean_shift, np.float64)
    logits = shifted @ np.asarray(weights, np.float64)
    return logits if bias is None else logits + np.asarray(bias, np.float64)


# ------------------------------------------------------------------------------------------
# Same samples, same MC averages.


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("with_shift,with_bias", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("diag_mode", DIAG_MODES)
def test_both_forms_give_the_reference_logit_samples(diag_mode, with_shift, with_bias, share):
    phi, weights, bias, noise = problem(diag_mode, with_shift, with_bias)
    dense, w_once = both_forms(phi, weights, noise, bias)
    assert dense.num_factors == w_once.num_factors == FACTORS
    assert dense.diag_dim == w_once.diag_dim == diag_dim(diag_mode)
    sample_ids = jnp.arange(11)
    expected = reference_logits(phi, weights, bias, noise, diag_mode, np.arange(11), share)
    got_dense = het.sample_logits(dense, KEY, sample_ids, share)
    got_w_once = het.sample_logits(w_once, KEY, sample_ids, share)
    np.testing.assert_allclose(got_dense, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_w_once, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dense, got_w_once, rtol=1e-5, atol=1e-5)
    # The mean: phi + shift mapped through W, plus b, in both forms.
    mean = reference_mean(phi, weights, bias, noise)
    np.testing.assert_allclose(dense.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w_once.mean, mean, rtol=1e-5, atol=1e-5)


def test_shared_scalar_draws_one_scalar_per_sample_in_the_dense_form():
    # W = I, phi = 0, V = 0: the logits are d * e, one e for all D dimensions of a sample.
    phi, _, _, noise = problem("shared_scalar", with_shift=False)
    noise = noise.replace(factors=jnp.zeros_like(noise.factors))
    dense = het.prelogit_noise_logits(jnp.zeros_like(phi), jnp.eye(DIM), noise, form="dense")
    sampled = np.asarray(het.sample_logits(dense, KEY, jnp.arange(4)))
    _, diag_draws = het.standard_normal_draws(KEY, jnp.arange(4), BATCH, FACTORS, 1)
    np.testing.assert_allclose(
        sampled, np.asarray(noise.diag_scale) * np.asarray(diag_draws), rtol=1e-6, atol=1e-7
    )


def reference_mc_log_probs(logits, tau):
    probs = special.softmax(logits / tau, axis=-1)
    return np.log(probs.mean(axis=0))


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("num_samples,chunk_size", [(13, 4), (5, 8)])
@pytest.mark.parametrize("diag_mode", DIAG_MODES)
def test_both_forms_give_the_reference_mc_averages(diag_mode, num_samples, chunk_size, share):
    phi, weights, bias, noise = problem(diag_mode)
    tau = 0.8
    logits = reference_logits(phi, weights, bias, noise, diag_mode, np.arange(num_samples), share)
    expected = reference_mc_log_probs(logits, tau)
    labels = np.array([6, 0, 2, 2, 5])
    targets = (np.random.default_rng(3).uniform(size=(BATCH, CLASSES)) > 0.5).astype(np.float32)
    sig = special.expit(logits / tau).mean(axis=0)
    expected_sigmoid = np.sum(targets * np.log(sig) + (1 - targets) * np.log1p(-sig), axis=-1)
    sampling = dict(num_samples=num_samples, chunk_size=chunk_size, share_across_batch=share)
    results = {}
    for distribution in both_forms(phi, weights, noise, bias):
        log_probs = het.mc_log_probs(distribution, jnp.float32(tau), KEY, **sampling)
        log_lik = het.mc_log_likelihood(
            distribution, jnp.float32(tau), jnp.asarray(labels), KEY, **sampling
        )
        sigmoid_lik = het.mc_log_likelihood(
            distribution,
            jnp.float32(tau),
            jnp.asarray(targets),
            KEY,
            likelihood="sigmoid",
            **sampling,
        )
        np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            log_lik, expected[np.arange(BATCH), labels], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(sigmoid_lik, expected_sigmoid, rtol=1e-5, atol=1e-5)
        results[type(distribution).__name__] = (log_probs, log_lik, sigmoid_lik)
    for dense, w_once in zip(*results.values(), strict=True):
        np.testing.assert_allclose(dense, w_once, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("diag_mode", DIAG_MODES)
def test_deterministic_predictions_agree_between_forms(diag_mode):
    phi, weights, bias, noise = problem(diag_mode)
    dense, w_once = both_forms(phi, weights, noise, bias)
    mean = reference_mean(phi, weights, bias, noise)
    labels = jnp.array([1, 0, 6, 2, 3])
    for distribution in (dense, w_once):
        log_probs = het.deterministic_log_probs(distribution, jnp.float32(0.5))
        np.testing.assert_allclose(
            log_probs, special.log_softmax(mean / 0.5, -1), rtol=1e-5, atol=1e-5
        )
        log_lik = het.deterministic_log_likelihood(distribution, jnp.float32(0.5), labels)
        np.testing.assert_allclose(
            log_lik,
            special.log_softmax(mean / 0.5, -1)[np.arange(BATCH), labels],
            rtol=1e-5,
            atol=1e-5,
        )


# ------------------------------------------------------------------------------------------
# Same gradients, through the one-chunk (plain autodiff) and the chunked (custom VJP) paths.


@pytest.mark.parametrize("num_samples,chunk_size", [(13, 4), (6, 8)])
@pytest.mark.parametrize("with_shift,with_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("diag_mode", DIAG_MODES)
def test_both_forms_give_the_reference_gradients(
    diag_mode, with_shift, with_bias, num_samples, chunk_size
):
    phi, weights, bias, noise = problem(diag_mode, with_shift, with_bias)
    labels = jnp.array([6, 0, 2, 2, 5])
    factor_draws, diag_draws = het.standard_normal_draws(
        KEY, jnp.arange(num_samples), BATCH, FACTORS, diag_dim(diag_mode)
    )
    operands = dict(phi=phi, weights=weights, bias=bias, noise=noise, tau=jnp.float32(0.7))

    def loss(ops, form):
        distribution = het.prelogit_noise_logits(
            ops["phi"], ops["weights"], ops["noise"], ops["bias"], form=form
        )
        log_lik = het.mc_log_likelihood(
            distribution,
            ops["tau"],
            labels,
            KEY,
            num_samples=num_samples,
            chunk_size=chunk_size,
        )
        return -jnp.mean(log_lik)

    def reference_loss(ops):
        n = ops["noise"]
        eps = jnp.einsum("bdr,sbr->sbd", n.factors, factor_draws)
        if n.diag_scale is not None:
            eps = eps + n.diag_scale * diag_draws
        if n.mean_shift is not None:
            eps = eps + n.mean_shift
        logits = (ops["phi"] + eps) @ ops["weights"]
        if ops["bias"] is not None:
            logits = logits + ops["bias"]
        probs = jax.nn.softmax(logits / ops["tau"], axis=-1).mean(axis=0)
        return -jnp.mean(jnp.log(probs[jnp.arange(BATCH), labels]))

    expected_value, expected = jax.value_and_grad(reference_loss)(operands)
    grads = {}
    for form in ("dense", "w_once"):
        value, grads[form] = jax.value_and_grad(loss)(operands, form)
        assert float(value) == pytest.approx(float(expected_value), rel=1e-5)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    # phi, W, V, d, shift, b and tau all get a gradient, the same in both forms.
    assert len(expected_leaves) == 3 + (diag_mode is not None) + with_shift + with_bias + 1
    for form, got in grads.items():
        got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
        for path, leaf in expected_leaves:
            assert float(jnp.abs(leaf).max()) > 1e-6, path
            np.testing.assert_allclose(
                got_leaves[path], leaf, rtol=1e-4, atol=1e-6, err_msg=f"{form} {path}"
            )
    dense_leaves = dict(jax.tree_util.tree_leaves_with_path(grads["dense"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads["w_once"]):
        np.testing.assert_allclose(
            dense_leaves[path], leaf, rtol=1e-5, atol=1e-6, err_msg=str(path)
        )


def test_one_chunk_and_chunked_reductions_agree_with_gradients():
    # The same S = 7 samples as one chunk (plain autodiff) and as chunks of 2 (custom VJP).
    phi, weights, bias, noise = problem("per_dim")
    labels = jnp.array([6, 0, 2, 2, 5])

    def loss(phi_, weights_, chunk_size):
        distribution = het.prelogit_noise_logits(phi_, weights_, noise, bias, form="dense")
        return het.mc_log_likelihood(
            distribution, jnp.float32(0.7), labels, KEY, num_samples=7, chunk_size=chunk_size
        ).sum()

    one_value, one_grads = jax.value_and_grad(loss, argnums=(0, 1))(phi, weights, 7)
    chunked_value, chunked_grads = jax.value_and_grad(loss, argnums=(0, 1))(phi, weights, 2)
    assert float(one_value) == pytest.approx(float(chunked_value), rel=1e-6)
    for one, chunked in zip(one_grads, chunked_grads, strict=True):
        np.testing.assert_allclose(one, chunked, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The cost rule and the head's choice.


@pytest.mark.parametrize(
    "num_samples,dim,factors,diag_mode,dense_cost,w_once_cost",
    [
        # per_dim: w_once = D + R*D + S*R + S*D.
        (16, 256, 8, "per_dim", 16 * 256, 256 + 2048 + 128 + 4096),
        # none: w_once = D + R*D + S*R.
        (9, 256, 8, None, 2304, 256 + 2048 + 72),
        (10, 256, 8, None, 2560, 256 + 2048 + 80),
        # shared_scalar: w_once = D + R*D + S*R + D + S.
        (10, 256, 8, "shared_scalar", 2560, 256 + 2048 + 80 + 256 + 10),
        (11, 256, 8, "shared_scalar", 2816, 256 + 2048 + 88 + 256 + 11),
    ],
)
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_form_costs_follow_the_flop_and_byte_count(
    num_samples, dim, factors, diag_mode, dense_cost, w_once_cost, num_chunks
):
    costs = het.prelogit_form_costs(num_samples, dim, factors, diag_mode, num_chunks)
    # W^T V, f32[B, K, R]: written once, then per chunk read forward, read backward and its
    # gradient accumulated; dense forms no K-sized tensor beyond the logits both forms share.
    w_once_bytes = 4 * factors * (1 + 3 * num_chunks)
    assert costs == {
        "dense": {"macs": dense_cost, "bytes": 0},
        "w_once": {"macs": w_once_cost, "bytes": w_once_bytes},
    }


@pytest.mark.parametrize(
    "num_samples,dim,factors,diag_mode,platform,expected",
    [
        # Per-dimension diagonal noise: dense whatever S (W once adds W^T V on top of D*K/sample).
        (1, 256, 8, "per_dim", "cpu", "dense"),
        (1000, 1024, 50, "per_dim", "gpu", "dense"),
        (None, 1024, 50, "per_dim", "cpu", "dense"),
        # No diag, CPU (32 MAC per byte, W^T V's bytes 4*8*4 = 128): dense iff
        # S*D <= D + R*D + S*R + 4096; D=256, R=8: 25*256 = 6400 <= 6600, 26*256 = 6656 > 6608.
        (25, 256, 8, None, "cpu", "dense"),
        (26, 256, 8, None, "cpu", "w_once"),
        # The same on a GPU (100 MAC per byte: + 12,800): 60*256 = 15,360 <= 15,584,
        # 61*256 = 15,616 > 15,592.
        (60, 256, 8, None, "gpu", "dense"),
        (61, 256, 8, None, "gpu", "w_once"),
        # Shared scalar, CPU: 26*256 = 6656 <= 6890, 27*256 = 6912 > 6899.
        (26, 256, 8, "shared_scalar", "cpu", "dense"),
        (27, 256, 8, "shared_scalar", "cpu", "w_once"),
        # The reference setting, S = 1000, R = 50, D = 1024: 1,024,000 > 102,224 + bytes.
        (1000, 1024, 50, None, "tpu", "w_once"),
        (1000, 1024, 50, "shared_scalar", "cpu", "w_once"),
        # R >= D: W^T V is no smaller than V, W once never pays (8000 <= 8072).
        (1000, 8, 8, None, "cpu", "dense"),
        # No samples (deterministic): only the mean, 0 <= D + R*D.
        (0, 256, 8, "shared_scalar", "cpu", "dense"),
        # Unknown S without per-dim diag: W once, whose per-sample cost is R*K.
        (None, 256, 8, "shared_scalar", "cpu", "w_once"),
        (None, 256, 8, None, "gpu", "w_once"),
    ],
)
def test_form_rule(num_samples, dim, factors, diag_mode, platform, expected):
    chosen = het.prelogit_form(num_samples, dim, factors, diag_mode, platform=platform)
    assert chosen == expected


def test_more_chunks_make_w_once_dearer():
    # Each chunk reads W^T V again: at S = 30 (no diag, D = 256, R = 8, CPU) W once wins in one
    # chunk (7680 > 2544 + 32 * 128) and loses in four (bytes 4*8*13 = 416: 7680 <= 2544 + 13312).
    assert het.prelogit_form(30, 256, 8, None, num_chunks=1, platform="cpu") == "w_once"
    assert het.prelogit_form(30, 256, 8, None, num_chunks=4, platform="cpu") == "dense"


def test_auto_form_and_bad_form():
    phi, weights, bias, noise = problem("shared_scalar")
    # D = 6, R = 3, shared scalar, CPU: dense iff 6 S <= 6 + 18 + 3 S + 6 + S + 32 * 4 * 3 * 4,
    # i.e. S <= 783.
    assert jax.default_backend() == "cpu"
    auto = het.prelogit_noise_logits(phi, weights, noise, bias, num_samples=783)
    assert isinstance(auto, het.PrelogitDistribution)
    auto = het.prelogit_noise_logits(phi, weights, noise, bias, num_samples=784)
    assert isinstance(auto, het.LogitDistribution)
    per_dim = noise.replace(shared_scalar_diag=False)
    auto = het.prelogit_noise_logits(phi, weights, per_dim, bias, num_samples=10_000)
    assert isinstance(auto, het.PrelogitDistribution)
    with pytest.raises(ValueError, match="form"):
        het.prelogit_noise_logits(phi, weights, noise, bias, form="naive")
    with pytest.raises(ValueError, match="diag_mode"):
        het.prelogit_form(4, 8, 2, "full")


def chosen_forms(monkeypatch, model, phi, **call):
    """The types of distribution the head builds in one call."""
    built = []
    original = logit_distributions.prelogit_noise_logits

    def recording(*args, **kwargs):
        distribution = original(*args, **kwargs)
        built.append(type(distribution).__name__)
        return distribution

    monkeypatch.setattr(logit_distributions, "prelogit_noise_logits", recording)
    params = model.init({"params": KEY, "noise": KEY}, phi)
    built.clear()
    model.apply(params, phi, rngs={"noise": KEY}, **call)
    return built


@pytest.mark.parametrize(
    "diag_mode,call,expected",
    [
        # D = 8, R = 2, per-dim diag: always dense.
        ("per_dim", dict(train=True), "PrelogitDistribution"),
        ("per_dim", dict(train=False), "PrelogitDistribution"),
        # Shared scalar, CPU, one chunk: dense iff 8 S <= 8 + 16 + 2 S + 8 + S + 32 * 4 * 2 * 4,
        # i.e. S <= 211.2: train S = 211 dense, eval S = 212 W once, deterministic dense.
        ("shared_scalar", dict(train=True), "PrelogitDistribution"),
        ("shared_scalar", dict(train=False), "LogitDistribution"),
        ("shared_scalar", dict(deterministic=True), "PrelogitDistribution"),
    ],
)
def test_head_picks_the_form_of_the_cost_rule(monkeypatch, diag_mode, call, expected):
    model = het.HeteroscedasticHead(
        num_classes=40,
        kind="hetxl",
        noise=het.NoiseConfig(num_factors=2, diag_mode=diag_mode),
        sampling=het.Sampling(train_samples=211, eval_samples=212),
    )
    phi = jax.random.normal(KEY, (3, 8))
    assert model.chunk_for(3, train=False) == 212  # 3 x 40 logits a sample: all in one chunk
    assert chosen_forms(monkeypatch, model, phi, **call) == [expected]


def test_head_takes_a_forced_form():
    # Shared scalar at S = 19 picks dense (above); forced, W once gives the same log-likelihoods.
    phi = jax.random.normal(KEY, (3, 8))
    labels = jnp.array([0, 5, 39])
    values = {}
    for form in ("auto", "dense", "w_once"):
        model = het.HeteroscedasticHead(
            num_classes=40,
            kind="hetxl",
            noise=het.NoiseConfig(num_factors=2, diag_mode="shared_scalar"),
            sampling=het.Sampling(train_samples=19, eval_samples=20),
            prelogit_form=form,
        )
        params = model.init({"params": KEY, "noise": KEY}, phi)
        assert model.form_for(8, 3, train=True) == ("dense" if form == "auto" else form)
        values[form] = model.apply(params, phi, labels, train=True, rngs={"noise": KEY})
    np.testing.assert_allclose(values["w_once"], values["dense"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(values["auto"], values["dense"])
