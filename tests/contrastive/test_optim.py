"""The optimizer block: schedules, AdamW / SGD / Adafactor steps, clipping, freezing, validation.

Expectations are written out by hand (closed-form schedules, numpy optimizer steps), not derived
from optax.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive import optim


def tiny_params():
    """A kernel, an embedding, a bias, a LayerNorm scale and a scalar temperature."""
    return {
        "dense": {
            "kernel": jnp.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]),
            "bias": jnp.array([0.1, -0.2]),
        },
        "embed": {"embedding": jnp.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])},
        "norm": {"scale": jnp.array([1.0, 0.9])},
        "t": jnp.array(2.3),
    }


def gradients(seed):
    """Fixed, made-up gradients shaped like tiny_params (no loss needed to test an update)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), tiny_params())


def run(optimizer, params, grads_per_step):
    """Applies one update per gradient tree, jitted; returns (params, state, last updates)."""

    @jax.jit
    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = optimizer.init(params)
    updates = None
    for grads in grads_per_step:
        params, state, updates = step(params, state, grads)
    return params, state, updates


def as_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def lr_values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


# ----------------------------------------------------------------------------------- schedules


def test_cosine_schedule_with_warmup_and_end_value():
    peak, warmup, total, end = 2.0, 10, 110, 0.2
    schedule = optim.learning_rate_schedule(
        {"name": "cosine", "warmup_steps": warmup, "end_lr_fraction": 0.1}, peak, total
    )
    steps = [0, 1, 5, 10, 35, 60, 85, 110, 500]

    def expected(s):
        if s < warmup:
            return peak * s / warmup
        progress = min((s - warmup) / (total - warmup), 1.0)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    np.testing.assert_allclose(lr_values(schedule, steps), [expected(s) for s in steps], rtol=1e-6)
    # Landmarks by value, not formula: warmup start/end, mid-decay, end.
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1.1, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(110)), 0.2, rtol=1e-6)


def test_linear_schedule_decays_to_zero_by_default():
    schedule = optim.learning_rate_schedule({"name": "linear", "warmup_steps": 4}, 1.0, 20)
    steps = [0, 2, 4, 8, 12, 20, 30]
    expected = [0.0, 0.5, 1.0, 0.75, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(lr_values(schedule, steps), expected, atol=1e-7)


def test_rsqrt_schedule_with_cooldown():
    peak, warmup, timescale, cooldown, total = 1.0, 10, 20, 30, 100
    schedule = optim.learning_rate_schedule(
        {
            "name": "rsqrt",
            "warmup_steps": warmup,
            "timescale": timescale,
            "cooldown_steps": cooldown,
        },
        peak,
        total,
    )
    steps = [0, 5, 10, 15, 20, 45, 70, 85, 99, 100]

    def expected(s):
        lr = peak * s / warmup if s < warmup else peak * math.sqrt(timescale / max(s, timescale))
        return lr * min(1.0, (total - s) / cooldown)

    np.testing.assert_allclose(lr_values(schedule, steps), [expected(s) for s in steps], rtol=1e-6)
    np.testing.assert_allclose(float(schedule(45)), 2 / 3, rtol=1e-6)  # sqrt(20 / 45)
    np.testing.assert_allclose(float(schedule(85)), math.sqrt(20 / 85) / 2, rtol=1e-6)
    assert float(schedule(100)) == 0.0


def test_constant_schedule_and_jit_with_integer_steps():
    schedule = optim.learning_rate_schedule(
        {"name": "constant", "warmup_steps": 2, "cooldown_steps": 4}, 0.3, 10
    )
    values = jax.jit(jax.vmap(schedule))(jnp.arange(11, dtype=jnp.int32))
    expected = [0.0, 0.15, 0.3, 0.3, 0.3, 0.3, 0.3, 0.225, 0.15, 0.075, 0.0]
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_fraction_equals_warmup_steps(name):
    steps = np.arange(0, 201)
    by_fraction = optim.learning_rate_schedule({"name": name, "warmup_fraction": 0.1}, 1e-3, 200)
    by_steps = optim.learning_rate_schedule({"name": name, "warmup_steps": 20}, 1e-3, 200)
    np.testing.assert_array_equal(lr_values(by_fraction, steps), lr_values(by_steps, steps))
    assert float(by_steps(10)) == pytest.approx(0.5e-3)


# ------------------------------------------------------------------------------------- AdamW


@pytest.mark.parametrize(
    "wd_rules, decayed",
    [
        (None, {"dense/kernel", "embed/embedding"}),  # default: ndim >= 2
        (["dense/bias", "t"], {"dense/bias", "t"}),
    ],
)
def test_adamw_two_steps_match_numpy(wd_rules, decayed):
    lr, wd, b1, b2, eps, total = 0.1, 0.5, 0.8, 0.9, 1e-6, 4
    config = {
        "name": "adamw",
        "lr": lr,
        "weight_decay": wd,
        "b1": b1,
        "b2": b2,
        "eps": eps,
        "schedule": {"name": "linear"},  # lr 0.1 at step 0, 0.075 at step 1
    }
    if wd_rules is not None:
        config["wd_rules"] = wd_rules
    params = tiny_params()
    optimizer, schedule = optim.make_optimizer(config, total, params)
    grads = [gradients(1), gradients(2)]
    new_params, _, _ = run(optimizer, params, grads)

    lrs = [lr, lr * (1 - 1 / total)]
    np.testing.assert_allclose(lr_values(schedule, [0, 1]), lrs, rtol=1e-6)
    p = {"/".join(k): v for k, v in _flatten(as_numpy(params))}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g_tree in enumerate(grads, start=1):
        g = {"/".join(k): x for k, x in _flatten(as_numpy(g_tree))}
        for name in p:
            m[name] = b1 * m[name] + (1 - b1) * g[name]
            v[name] = b2 * v[name] + (1 - b2) * g[name] ** 2
            m_hat = m[name] / (1 - b1**t)
            v_hat = v[name] / (1 - b2**t)
            direction = m_hat / (np.sqrt(v_hat) + eps)
            if name in decayed:
                direction = direction + wd * p[name]
            p[name] = p[name] - lrs[t - 1] * direction
    got = {"/".join(k): x for k, x in _flatten(as_numpy(new_params))}
    assert set(got) == set(p)
    for name in p:
        np.testing.assert_allclose(got[name], p[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _flatten(tree, prefix=()):
    """(path tuple, leaf) pairs of a nested dict, walked by hand."""
    for key, child in tree.items():
        if isinstance(child, dict):
            yield from _flatten(child, (*prefix, key))
        else:
            yield (*prefix, key), child


# ------------------------------------------------------------------------------ clipping, SGD


def test_clipping_happens_before_momentum():
    # Gradient (3, 4) has norm 5; clipped to norm 1 it is (0.6, 0.8). Clipping before momentum
    # gives a second update of -lr * 1.9 * (0.6, 0.8); clipping the momentum instead would give
    # -lr * (0.6, 0.8) again.
    lr, momentum = 0.5, 0.9
    config = {
        "name": "sgd",
        "lr": lr,
        "momentum": momentum,
        "clip_norm": 1.0,
        "schedule": {"name": "constant"},
    }
    params = {"w": jnp.array([1.0, 1.0])}
    optimizer, _ = optim.make_optimizer(config, 10, params)
    grads = {"w": jnp.array([3.0, 4.0])}
    _, _, first = run(optimizer, params, [grads])
    _, _, second = run(optimizer, params, [grads, grads])
    np.testing.assert_allclose(first["w"], [-0.3, -0.4], rtol=1e-6)
    np.testing.assert_allclose(second["w"], [-0.5 * 1.9 * 0.6, -0.5 * 1.9 * 0.8], rtol=1e-6)
    # A gradient already inside the ball is untouched.
    _, _, small = run(optimizer, params, [{"w": jnp.array([0.3, 0.4])}])
    np.testing.assert_allclose(small["w"], [-0.15, -0.2], rtol=1e-6)


def test_clipping_sees_only_trainable_gradients():
    # The frozen leaf's huge gradient must not enter the global norm: the trainable (3, 4)
    # is clipped by its own norm 5, not by ~1000.
    config = {
        "name": "sgd",
        "lr": 1.0,
        "clip_norm": 1.0,
        "freeze": ["img/.*"],
        "schedule": {"name": "constant"},
    }
    params = {"img": {"kernel": jnp.ones((2, 2))}, "txt": {"w": jnp.array([1.0, 1.0])}}
    optimizer, _ = optim.make_optimizer(config, 10, params)
    grads = {"img": {"kernel": jnp.full((2, 2), 500.0)}, "txt": {"w": jnp.array([3.0, 4.0])}}
    _, _, updates = run(optimizer, params, [grads])
    np.testing.assert_allclose(updates["txt"]["w"], [-0.6, -0.8], rtol=1e-6)
    np.testing.assert_array_equal(updates["img"]["kernel"], np.zeros((2, 2)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_numpy(nesterov):
    lr, mu, wd = 0.1, 0.9, 0.01
    config = {
        "name": "sgd",
        "lr": lr,
        "momentum": mu,
        "nesterov": nesterov,
        "weight_decay": wd,
        "schedule": {"name": "constant"},
    }
    params = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.5, -0.5])}
    optimizer, _ = optim.make_optimizer(config, 10, params)
    grads = [
        {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([1.0, 2.0])},
        {"kernel": jnp.array([[-0.5, 0.1], [0.2, 0.0]]), "bias": jnp.array([-1.0, 0.5])},
        {"kernel": jnp.array([[0.3, 0.3], [0.3, 0.3]]), "bias": jnp.array([0.0, 1.0])},
    ]
    new_params, _, _ = run(optimizer, params, grads)

    p = as_numpy(params)
    trace = {k: np.zeros_like(x) for k, x in p.items()}
    for g_tree in grads:
        g = as_numpy(g_tree)
        for name in p:
            trace[name] = mu * trace[name] + g[name]
            direction = g[name] + mu * trace[name] if nesterov else trace[name]
            if name == "kernel":  # the default decay rule: ndim >= 2 only
                direction = direction + wd * p[name]
            p[name] = p[name] - lr * direction
    for name in p:
        np.testing.assert_allclose(new_params[name], p[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------- Adafactor


def test_adafactor_first_step_and_factored_state():
    lr = 0.01
    config = {
        "name": "adafactor",
        "lr": lr,
        "min_dim_size_to_factor": 4,
        "clipping_threshold": 1.0,
        "momentum": 0.9,
        "schedule": {"name": "constant"},
    }
    rng = np.random.default_rng(0)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
    }
    optimizer, _ = optim.make_optimizer(config, 10, params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    new_params, state, updates = run(optimizer, params, [grads])

    # First step: the second-moment decay is 0, so the estimate is this step's g**2, factored
    # as row-mean x column-mean / overall mean for the matrix, and kept whole for the vector.
    g = as_numpy(grads)
    sq = g["kernel"] ** 2
    v_kernel = np.outer(sq.mean(axis=1), sq.mean(axis=0)) / sq.mean()
    expected = {"kernel": g["kernel"] / np.sqrt(v_kernel), "bias": np.sign(g["bias"])}
    for name, u in expected.items():
        u = u / max(1.0, np.sqrt(np.mean(u**2)))  # update clipping to RMS 1
        # Momentum without bias correction: the first step carries (1 - 0.9) of the update.
        np.testing.assert_allclose(updates[name], -lr * 0.1 * u, rtol=1e-4, err_msg=name)
    assert np.all(np.isfinite(np.asarray(new_params["kernel"])))

    # The matrix keeps one statistic per row and per column, far fewer than its 48 values.
    kernel_stats = [optax.tree.get(state, key)["kernel"] for key in ("v_row", "v_col", "v")]
    assert sorted(s.size for s in kernel_stats) == [1, 6, 8]
    assert sum(s.size for s in kernel_stats) < params["kernel"].size
    assert optax.tree.get(state, "v")["bias"].shape == (5,)


def test_adafactor_momentum_dtype():
    config = {"name": "adafactor", "momentum": 0.9, "momentum_dtype": "bfloat16"}
    params = {"kernel": jnp.ones((4, 4))}
    optimizer, _ = optim.make_optimizer(config, 10, params)
    state = optimizer.init(params)
    assert optax.tree.get(state, "ema")["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------ freezing


def test_frozen_leaves_get_zero_updates_and_no_state():
    config = {
        "lr": 0.1,
        "weight_decay": 0.1,
        "clip_norm": 1.0,
        "freeze": ["img/.*", "t"],
        "schedule": {"name": "cosine", "warmup_steps": 1},
    }
    params = {
        "img": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
        "txt": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
        "t": jnp.array(1.0),
    }
    # Shapes are enough to build the optimizer, as before params are allocated.
    optimizer, _ = optim.make_optimizer(config, 10, jax.eval_shape(lambda: params))
    grads = jax.tree.map(jnp.ones_like, params)
    new_params, state, updates = run(optimizer, params, [grads, grads, grads])

    for leaf in [*jax.tree.leaves(updates["img"]), updates["t"]]:
        assert np.all(np.asarray(leaf) == 0)
    assert (
        np.asarray(new_params["img"]["kernel"]).tobytes()
        == np.ones((3, 4)).astype(np.float32).tobytes()
    )
    for leaf_old, leaf_new in zip(
        jax.tree.leaves(params["txt"]), jax.tree.leaves(new_params["txt"]), strict=True
    ):
        assert not np.array_equal(leaf_old, leaf_new)
    # Adam's two moments for the 6 + 3 trainable values, nothing for the 17 frozen ones.
    float_state = sum(
        leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
    )
    assert float_state == 2 * (6 + 3)


# ---------------------------------------------------------------------------------- validation


def _params():
    return {"img": {"kernel": jnp.ones((2, 2))}, "txt": {"kernel": jnp.ones((2, 2))}}


@pytest.mark.parametrize(
    "config, culprit, problem",
    [
        ({"lrate": 0.1}, "optim: unknown key(s) ['lrate']", "known:"),
        ({"lr": "1e-3"}, "optim.lr", "finite number"),
        ({"lr": 0.0}, "optim.lr", "expected a number"),
        ({"lr": True}, "optim.lr", "finite number"),
        ({"weight_decay": -1.0}, "optim.weight_decay", "expected a number"),
        ({"name": "adam"}, "optim.name", "one of"),
        ({"clip_norm": "1"}, "optim.clip_norm", "finite number"),
        ({"freeze": "img/.*"}, "optim.freeze", "list of regex"),
        ({"wd_rules": ["img/("]}, "optim.wd_rules", "not a valid regex"),
        ({"name": "sgd", "b2": 0.95}, "optim.b2", "applies to name in ['adamw']"),
        ({"name": "adamw", "momentum": 0.9}, "optim.momentum", "not 'adamw'"),
        ({"name": "sgd", "nesterov": True}, "optim.nesterov", "needs a momentum"),
        ({"name": "sgd", "nesterov": 1}, "optim.nesterov", "True or False"),
        ({"name": "adafactor", "min_dim_size_to_factor": 1.5}, "optim.min_dim_size", "integer"),
        ({"name": "adafactor", "momentum_dtype": "fp16"}, "optim.momentum_dtype", "one of"),
        ({"schedule": "cosine"}, "optim.schedule", "mapping"),
        ({"wd_rules": ["txt/kernel", "txt/bias"]}, "optim.wd_rules", "'txt/bias' matches no"),
        ({"weight_decay": 0.1, "wd_rules": []}, "optim.wd_rules", "is empty"),
        (
            {"weight_decay": 0.1, "wd_rules": ["img/.*"], "freeze": ["img/.*"]},
            "optim.wd_rules",
            "only frozen parameters",
        ),
        ({"freeze": ["image/.*"]}, "optim.freeze", "image/"),
    ],
)
def test_optim_errors_name_the_key_and_list_known_keys(config, culprit, problem):
    with pytest.raises(ValueError) as err:
        optim.make_optimizer(config, 100, _params())
    message = str(err.value)
    assert culprit in message and problem in message, message
    if "unknown key" in culprit:
        assert f"known: {sorted(optim.OPTIM_DEFAULTS)}" in message, message


@pytest.mark.parametrize(
    "schedule, culprit, problem",
    [
        ({"name": "cosin"}, "schedule.name", "one of"),
        ({"warmup": 10}, "optim.schedule: unknown key(s) ['warmup']", "known:"),
        ({"warmup_steps": 5, "warmup_fraction": 0.1}, "schedule.warmup_fraction", "not both"),
        ({"warmup_steps": -1}, "schedule.warmup_steps", "integer >= 0"),
        ({"warmup_steps": 2.0}, "schedule.warmup_steps", "integer >= 0"),
        ({"warmup_fraction": 1.0}, "schedule.warmup_fraction", "[0.0, 1.0)"),
        ({"warmup_steps": 100}, "schedule.warmup_steps", "no decay steps"),
        ({"name": "rsqrt", "end_lr_fraction": 0.1}, "schedule.end_lr_fraction", "not 'rsqrt'"),
        ({"name": "cosine", "timescale": 10}, "schedule.timescale", "['rsqrt']"),
        ({"name": "rsqrt", "warmup_steps": 20, "timescale": 10}, "schedule.timescale", ">="),
        (
            {"name": "rsqrt", "warmup_steps": 50, "timescale": 50, "cooldown_steps": 60},
            "schedule.cooldown_steps",
            "exceed total_steps",
        ),
    ],
)
def test_schedule_errors_name_the_key_and_list_known_keys(schedule, culprit, problem):
    with pytest.raises(ValueError) as err:
        optim.make_optimizer({"schedule": schedule}, 100, _params())
    message = str(err.value)
    assert culprit in message and problem in message, message
    if "unknown key" in culprit:
        assert f"known: {sorted(optim.SCHEDULE_DEFAULTS)}" in message, message


def test_bad_total_steps_and_peak_lr():
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_optimizer({}, 0, _params())
    with pytest.raises(ValueError, match="peak_lr"):
        optim.learning_rate_schedule({}, -1.0, 10)


def test_defaults_build_adamw_and_resolve_to_applicable_keys():
    resolved = optim.validate_optim_config({}, 100)
    assert resolved["name"] == "adamw" and resolved["lr"] == optim.OPTIM_DEFAULTS["lr"]
    assert {"b1", "b2", "eps"} <= set(resolved) and "momentum" not in resolved
    assert resolved["schedule"]["warmup_steps"] == 0
    sgd = optim.validate_optim_config({"name": "sgd", "momentum": 0.9}, 100)
    assert sgd["momentum"] == 0.9 and "b1" not in sgd and "decay_rate" not in sgd
    # A config may start from the full defaults and switch optimizer and schedule: keys of
    # other variants are inert at their default values, and an error once changed.
    for name in optim.OPTIMIZER_NAMES:
        for schedule_name in optim.SCHEDULE_NAMES:
            schedule = {**optim.OPTIM_DEFAULTS["schedule"], "name": schedule_name}
            config = {**optim.OPTIM_DEFAULTS, "name": name, "schedule": schedule}
            optimizer, _ = optim.make_optimizer(config, 100, _params())
            optimizer.init(_params())
    with pytest.raises(ValueError, match="optim.b1: applies to name in"):
        optim.validate_optim_config({**optim.OPTIM_DEFAULTS, "name": "sgd", "b1": 0.95}, 100)
