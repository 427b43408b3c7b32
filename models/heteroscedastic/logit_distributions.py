"""Distributions over a heteroscedastic classifier's logits, and their Monte-Carlo samples.

A heteroscedastic classifier's logits are Gaussian, u ~ N(mean(x), Sigma_u(x)). HET puts the noise
on the K logits (`logit_noise_logits`); HET-XL on the D pre-logits, and it has two forms
(HETXL.md section 4). Pre-logit noise eps = V e_R + d * e_N gives u_s = (phi + eps_s)^T W + b,
which can be evaluated as written (`PrelogitDistribution`, the dense form: S matmuls with W per
example, D*K multiply-adds each) or, because the head is linear, as
u_s = (W^T phi + b) + (W^T V) e_R,s + W^T (d * e_N,s) (`LogitDistribution`, the "W once" form:
W^T V costs R*D*K once per example, then R*K per sample, but the per-dimension diagonal term
still costs D*K per sample). W once pays off only for many samples and no per-dimension diagonal
noise; `prelogit_form` picks the form from a flop count.

Sample s of example i draws its normals from fold_in(fold_in(key, s), i): samples do not depend on
the chunk size, the device count nor the form, and a reference can reproduce them with
`standard_normal_draws`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.heteroscedastic.noise import DIAG_MODES, NoiseParameters

PRELOGIT_FORMS = ("auto", "dense", "w_once")


class _NoiseDraws:
    """How many standard normals one (example, sample) draws: both forms read the same ones."""

    factors: jax.Array | None
    diag_scale: jax.Array | None
    shared_scalar_diag: bool

    @property
    def num_factors(self) -> int:
        return 0 if self.factors is None else self.factors.shape[-1]

    @property
    def diag_dim(self) -> int:
        """Size of e_N per example and sample (1 in shared-scalar mode, 0 without diag noise)."""
        if self.diag_scale is None:
            return 0
        return 1 if self.shared_scalar_diag else self.diag_scale.shape[-1]


@struct.dataclass
class LogitDistribution(_NoiseDraws):
    """Gaussian over logits u = mean + factors @ e_R + diagonal term, in factorised form.

    HET's distribution (noise in logit space) and HET-XL's in the "W once" form.

    Attributes:
      mean: f32[B, K], noise-free logits (any mean shift of the noise included).
      factors: f32[B, K, R], the low-rank part mapped to logit space, or None (no low-rank noise).
      diag_scale: per-dimension scale d, f32[B, N]; in shared-scalar mode the logit-space
        direction of the broadcast scalar, f32[B, K]. None means no diagonal noise.
      diag_projection: f32[N, K] maps the per-dimension diagonal noise to logits (W for pre-logit
        noise); None when the diagonal noise already lives in logit space.
      shared_scalar_diag: e_N is one scalar per (example, sample).
    """

    mean: jax.Array
    factors: jax.Array | None = None
    diag_scale: jax.Array | None = None
    diag_projection: jax.Array | None = None
    shared_scalar_diag: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class PrelogitDistribution(_NoiseDraws):
    """HET-XL's Gaussian over logits in the dense form: u_s = (phi + eps_s)^T W + b.

    The noise eps_s = V e_R,s + d * e_N,s is drawn in the D-dim pre-logit space and each sample is
    mapped through W: D*K multiply-adds per example and sample, like DET's one logit matmul, and
    nothing of size K*R is formed.

    Attributes:
      pre_logits: phi + mean shift of the noise, f32[B, D].
      factors: V, f32[B, D, R], or None (no low-rank noise).
      diag_scale: d, f32[B, D], or None (no diagonal noise).
      class_matrix: W, f32[D, K].
      class_bias: b, f32[K], or None.
      shared_scalar_diag: e_N is one scalar per (example, sample), broadcast over the D dimensions.
    """

    pre_logits: jax.Array
    class_matrix: jax.Array
    factors: jax.Array | None = None
    diag_scale: jax.Array | None = None
    class_bias: jax.Array | None = None
    shared_scalar_diag: bool = struct.field(pytree_node=False, default=False)

    @property
    def mean(self) -> jax.Array:
        """Noise-free logits f32[B, K] (the mean shift included)."""
        logits = self.pre_logits @ self.class_matrix
        return logits if self.class_bias is None else logits + self.class_bias


Distribution = LogitDistribution | PrelogitDistribution


# Multiply-adds one byte of W^T V's traffic is worth, by platform: a matmul-bound form and a
# memory-bound one are compared in one unit. CPU: fitted to `benchmark head --forms
# auto,dense,w_once` with shared-scalar noise at K = 10k (results/scaling/forms_shared_scalar.json:
# W once loses at S = 16, 863 against 599 ms, and wins at S = 64, 4,217 against 4,616 ms, which
# brackets the value between 11 and 59). GPU and TPU: from the ratio of matmul speed to memory
# bandwidth (H100 ~ 500 TMAC/s bf16 over 3.4 TB/s), not yet measured.
MACS_PER_BYTE = {"cpu": 32.0, "gpu": 100.0, "tpu": 100.0}


def prelogit_form_costs(
    num_samples: int,
    dim: int,
    num_factors: int,
    diag_mode: str | None,
    num_chunks: int = 1,
) -> dict[str, dict[str, int]]:
    """Work per example and class of the two forms of S samples of HET-XL's logits.

    {"dense" | "w_once": {"macs": multiply-adds, "bytes": memory traffic beyond the logits}}.
    Only the terms proportional to K count (K >> D, R in the settings that matter); both forms
    write and read the same S x B x K logits, so those bytes cancel. The backward pass repeats
    each matmul twice, which scales both forms' multiply-adds alike.
      dense:  S*D            each sample's (phi + eps_s) @ W; no other K-sized tensor.
      w_once: D + R*D        phi @ W and W^T V, once per example;
              + S*R          each sample's (W^T V) e_R,s;
              + S*D          per_dim: each sample's W^T (d * e_N,s);
              + D + S        shared_scalar: d^T W once, then its multiple e_N,s per sample;
              bytes 4*R*(1 + 3*chunks): f32[B, K, R] W^T V is written once and, for every chunk
              of samples, read forward, read again backward and its gradient accumulated: a
              batched matrix-vector product per example, bound by memory, not by the matmul unit.
    diag_mode: "per_dim", "shared_scalar" or None (no diagonal noise).
    """
    _check_diag_mode(diag_mode)
    w_once = dim + num_factors * dim + num_samples * num_factors
    if diag_mode == "per_dim":
        w_once += num_samples * dim
    elif diag_mode == "shared_scalar":
        w_once += dim + num_samples
    return {
        "dense": {"macs": num_samples * dim, "bytes": 0},
        "w_once": {"macs": w_once, "bytes": 4 * num_factors * (1 + 3 * max(1, num_chunks))},
    }


def _check_diag_mode(diag_mode: str | None) -> None:
    if diag_mode is not None and diag_mode not in DIAG_MODES:
        raise ValueError(f"diag_mode {diag_mode!r} is unknown; known: {DIAG_MODES} or None")


def prelogit_form(
    num_samples: int | None,
    dim: int,
    num_factors: int,
    diag_mode: str | None,
    num_chunks: int = 1,
    platform: str | None = None,
) -> str:
    """The form of HET-XL's logits ("dense" or "w_once") that costs less for S samples.

    Cost = multiply-adds + MACS_PER_BYTE[platform] * bytes (`prelogit_form_costs`). With
    per-dimension diagonal noise W once never wins (it still maps D-dim noise through W per
    sample, on top of W^T V). Otherwise dense wins while S*D <= D*(R + 1) + S*R (plus D + S in
    shared-scalar mode) plus the bytes of W^T V: W once pays off only over many samples. Ties go
    to dense, which also never holds the f32[B, K, R] tensor W^T V.
    num_samples: S; 0 when only the mean is needed (deterministic prediction); None when unknown,
      which picks W once unless per-dimension diagonal noise is present: its cost per sample,
      R*K, is the smaller one for large S.
    num_chunks: how many chunks the S samples are evaluated in (W^T V is read once per chunk).
    platform: "cpu", "gpu" or "tpu"; None: jax's default backend.
    diag_mode: "per_dim", "shared_scalar" or None (no diagonal noise).
    """
    _check_diag_mode(diag_mode)
    if diag_mode == "per_dim":
        return "dense"
    if num_samples is None:
        return "w_once"
    if platform is None:
        platform = jax.default_backend()
    per_byte = MACS_PER_BYTE.get(platform, MACS_PER_BYTE["gpu"])
    costs = prelogit_form_costs(num_samples, dim, num_factors, diag_mode, num_chunks)
    total = {form: cost["macs"] + per_byte * cost["bytes"] for form, cost in costs.items()}
    return "dense" if total["dense"] <= total["w_once"] else "w_once"


def prelogit_noise_logits(
    pre_logits: jax.Array,
    class_matrix: jax.Array,
    noise: NoiseParameters,
    class_bias: jax.Array | None = None,
    *,
    num_samples: int | None = None,
    form: str = "auto",
) -> Distribution:
    """HET-XL: noise in pre-logit space, u = (phi + eps)^T W + b, in its cheaper form.

    Args:
      pre_logits: phi, f32[B, D].
      class_matrix: W, f32[D, K]; any class matrix, e.g. a batch of text embeddings transposed.
      noise: NoiseParameters in the D-dim pre-logit space (factors or diag_scale may be None).
      class_bias: b, f32[K], or None.
      num_samples: how many samples will be drawn from the result (0: none, only its mean), for
        the choice of form; None: unknown (see `prelogit_form`).
      form: "auto" (`prelogit_form`'s choice), "dense" (`PrelogitDistribution`) or "w_once"
        (`LogitDistribution`). Both consume the same standard normals: the logits agree up to
        float rounding whichever is chosen.
    """
    if form not in PRELOGIT_FORMS:
        raise ValueError(f"form {form!r} is unknown; known: {PRELOGIT_FORMS}")
    shifted = pre_logits if noise.mean_shift is None else pre_logits + noise.mean_shift
    if form == "auto":
        if noise.diag_scale is None:
            diag_mode = None
        else:
            diag_mode = "shared_scalar" if noise.shared_scalar_diag else "per_dim"
        num_factors = 0 if noise.factors is None else noise.factors.shape[-1]
        form = prelogit_form(num_samples, pre_logits.shape[-1], num_factors, diag_mode)
    if form == "dense":
        return PrelogitDistribution(
            shifted,
            class_matrix,
            noise.factors,
            noise.diag_scale,
            class_bias,
            noise.shared_scalar_diag,
        )
    mean = shifted @ class_matrix
    if class_bias is not None:
        mean = mean + class_bias
    factors = None
    if noise.factors is not None:
        factors = jnp.einsum("bdr,dk->bkr", noise.factors, class_matrix)
    if noise.diag_scale is None:
        return LogitDistribution(mean, factors, None, None, noise.shared_scalar_diag)
    if noise.shared_scalar_diag:
        # d * e (e a scalar) maps to e * (d^T W): fold the projection in once per example.
        return LogitDistribution(mean, factors, noise.diag_scale @ class_matrix, None, True)
    return LogitDistribution(mean, factors, noise.diag_scale, class_matrix, False)


def logit_noise_logits(logits: jax.Array, noise: NoiseParameters) -> LogitDistribution:
    """HET: noise directly in logit space (N = K), u = logits + eps."""
    mean = logits if noise.mean_shift is None else logits + noise.mean_shift
    return LogitDistribution(mean, noise.factors, noise.diag_scale, None, noise.shared_scalar_diag)


def standard_normal_draws(
    key: jax.Array,
    sample_ids: jax.Array,
    batch_size: int,
    num_factors: int,
    diag_dim: int,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The standard normals of the given samples: e_R f32[C, B', R] and e_N f32[C, B', diag_dim].

    B' is 1 when the draws are shared across the batch, else batch_size. The draws of (sample s,
    example i) come from fold_in(fold_in(key, s), i) alone, so they do not depend on which other
    samples are drawn (chunking) nor on how the batch is split over devices: a device holding
    global examples example_ids i32[batch_size] (default arange) draws exactly what a single
    device holding the whole batch draws for them.
    """
    rows = 1 if share_across_batch else batch_size
    if example_ids is None or share_across_batch:
        example_ids = jnp.arange(rows)

    def one_draw(sample_id, example_id):
        draw_key = jax.random.fold_in(jax.random.fold_in(key, sample_id), example_id)
        factor_key, diag_key = jax.random.split(draw_key)
        return (
            jax.random.normal(factor_key, (num_factors,), jnp.float32),
            jax.random.normal(diag_key, (diag_dim,), jnp.float32),
        )

    per_example = jax.vmap(one_draw, in_axes=(None, 0))
    return jax.vmap(per_example, in_axes=(0, None))(sample_ids, example_ids)


def sample_prelogit_noise(
    noise: NoiseParameters,
    key: jax.Array,
    sample_ids: jax.Array,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> jax.Array:
    """Pre-logit noise samples eps f32[C, B, N] = mean_shift + V e_R + d * e_N, drawn densely.

    The contrastive loss uses this form: there the class matrix (all texts of the global batch) is
    as large as the batch, so mapping V through it once (the W-once form) saves nothing over adding
    the noise to the embeddings, and noisy embeddings can be re-normalised.
    """
    batch_size, noise_dim, num_factors = noise.factors.shape
    diag_dim = 1 if noise.shared_scalar_diag else noise_dim
    factor_draws, diag_draws = standard_normal_draws(
        key, sample_ids, batch_size, num_factors, diag_dim, share_across_batch, example_ids
    )
    eps = jnp.einsum("bnr,cbr->cbn", noise.factors, factor_draws) + noise.diag_scale * diag_draws
    return eps if noise.mean_shift is None else eps + noise.mean_shift


def sample_logits(
    distribution: Distribution,
    key: jax.Array,
    sample_ids: jax.Array,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> jax.Array:
    """Logit samples f32[C, B, K] for the C given sample ids (example_ids: see the draws).

    Both forms draw the same standard normals for the same (key, sample, example), so a
    `LogitDistribution` and a `PrelogitDistribution` of the same noise give the same samples.
    """
    dense = isinstance(distribution, PrelogitDistribution)
    batch_size = (distribution.pre_logits if dense else distribution.mean).shape[0]
    factor_draws, diag_draws = standard_normal_draws(
        key,
        sample_ids,
        batch_size,
        distribution.num_factors,
        distribution.diag_dim,
        share_across_batch,
        example_ids,
    )
    num_chunk = sample_ids.shape[0]
    factor_draws = jnp.broadcast_to(factor_draws, (num_chunk, batch_size, factor_draws.shape[-1]))
    diag_draws = jnp.broadcast_to(diag_draws, (num_chunk, batch_size, diag_draws.shape[-1]))
    if dense:
        return _dense_sample_logits(distribution, factor_draws, diag_draws)
    logits = jnp.broadcast_to(distribution.mean, (num_chunk,) + distribution.mean.shape)
    if distribution.factors is not None:
        logits = logits + jnp.einsum("bkr,cbr->cbk", distribution.factors, factor_draws)
    if distribution.diag_scale is None:
        return logits
    if distribution.shared_scalar_diag:
        return logits + diag_draws * distribution.diag_scale
    diag_noise = diag_draws * distribution.diag_scale
    if distribution.diag_projection is not None:
        diag_noise = diag_noise @ distribution.diag_projection
    return logits + diag_noise


def _dense_sample_logits(
    distribution: PrelogitDistribution, factor_draws: jax.Array, diag_draws: jax.Array
) -> jax.Array:
    """(phi + eps_s) @ W + b, f32[C, B, K], from e_R f32[C, B, R] and e_N f32[C, B, diag_dim].

    One matmul with W per sample; the noise itself costs only D*R per example and sample.
    """
    pre_logits = distribution.pre_logits
    noisy = jnp.broadcast_to(pre_logits, (factor_draws.shape[0],) + pre_logits.shape)
    if distribution.factors is not None:
        noisy = noisy + jnp.einsum("bdr,cbr->cbd", distribution.factors, factor_draws)
    if distribution.diag_scale is not None:
        # In shared-scalar mode e_N is f32[C, B, 1]: one scalar broadcast over the D dimensions.
        noisy = noisy + distribution.diag_scale * diag_draws
    logits = noisy @ distribution.class_matrix
    return logits if distribution.class_bias is None else logits + distribution.class_bias
