"""Gradient accumulation on 8 simulated devices: the full-batch loss and gradients (every negative
kept), microbatches formed without communication, and one microbatch's activation memory."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.accumulation import (
    accumulated_contrastive_value_and_grad,
    merge_microbatches,
    microbatch,
)
from contrastive.freezing import frozen_mask
from contrastive.losses import make_loss, shard_loss
from contrastive.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated, state_shardings
from contrastive.objectives import contrastive_objective
from contrastive.xla_stats import compile_function
from models.heteroscedastic import NoiseConfig, Sampling, TemperatureConfig
from models.two_towers import TwoTowers

BATCH, IMAGE, LENGTH, VOCAB = 32, 16, 8, 64

LOSS_OPTIONS = {
    "clip": {"column_chunk_size": 8},
    "hetxl": {"sampling": Sampling(train_samples=6, chunk_size=3), "column_chunk_size": 8},
}


# LLVM's optimisation passes cost a third of the compile time of these tiny programs and buy
# nothing at this size; the HLO, and so the arithmetic being compared, is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def two_towers(loss_name="clip", patch=8, dropout=0.0):
    """A tiny two-tower model; without dropout, a microbatched forward is the full-batch one."""
    return TwoTowers(
        image_tower={
            "name": "vit",
            "variant": f"mu/{patch}",
            "pool_type": "gap",
            "dropout": dropout,
        },
        text_tower={
            "name": "text_transformer",
            "variant": "mu",
            "vocab_size": VOCAB,
            "max_len": LENGTH,
            "pool_type": "mean",
            "dropout": dropout,
        },
        embed_dim=16,
        image_noise=NoiseConfig(num_factors=2, diag_scale_init=0.05, kernel_init_scale=0.1)
        if loss_name == "hetxl"
        else None,
        temperature=TemperatureConfig("bounded_log", init=0.1, lo=0.01, hi=1.0),
    )


def random_batch(mesh, batch_size=BATCH, image_size=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
        "text": rng.integers(1, VOCAB, (batch_size, LENGTH)).astype(np.int32),
    }
    return jax.device_put(batch, batch_sharding(mesh))


def sharded_params(model, mesh, batch):
    def init(key):
        return model.init(key, batch["image"][:1], batch["text"][:1])["params"]

    # Every array big enough to split is split over "fsdp" (the tiny model has no large ones).
    shardings = state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, min_fsdp_size=16)
    # Jitted: initialising op by op would take longer than all the compiles of a test.
    return jax.jit(init, out_shardings=shardings, compiler_options=FAST_COMPILE)(jax.random.key(0))


@functools.cache
def full_batch_case(loss_name):
    """(model, loss, mesh, params, batch, rng, ((loss, metrics), grads)) of the plain objective."""
    mesh = make_mesh({"data": 4, "fsdp": 2})
    model = two_towers(loss_name)
    loss = make_loss(loss_name, **LOSS_OPTIONS[loss_name])
    batch = random_batch(mesh)
    params = sharded_params(model, mesh, batch)
    rng = jax.random.key(3)
    objective = contrastive_objective(model, loss, mesh)
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    result = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(params, batch, rng)
    return model, loss, mesh, params, batch, rng, result


def assert_gradients_close(actual, expected, rtol=1e-5):
    """Each leaf within rtol of the largest magnitude in the expected leaf.

    Leaves whose exact gradient is zero (attention key biases: a softmax ignores a shift shared by
    all keys) hold rounding noise only, so they are held to rtol of the largest gradient overall.
    """
    largest = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected))
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(actual), strict=True):
        want, got = np.asarray(want), np.asarray(got)
        assert got.shape == want.shape, path
        tolerance = rtol * max(float(np.max(np.abs(want))), 1e-2 * largest)
        error = float(np.max(np.abs(got - want)))
        assert error <= tolerance, (jax.tree_util.keystr(path), error, tolerance)


@pytest.mark.parametrize("loss_name", ["clip", "hetxl"])
def test_accumulated_loss_and_gradients_equal_the_full_batch_ones(loss_name):
    model, loss, mesh, params, batch, rng, expected = full_batch_case(loss_name)
    (want_loss, want_metrics), want_grads = expected
    assert float(np.abs(want_grads["tau"]["t"]).max()) > 0
    for accum_steps in (2, 4):
        value_and_grad = accumulated_contrastive_value_and_grad(model, loss, mesh, accum_steps)
        (got_loss, got_metrics), got_grads = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(
            params, batch, rng
        )
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
        assert set(got_metrics) == set(want_metrics)
        for key, value in want_metrics.items():
            assert float(got_metrics[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
        assert_gradients_close(got_grads, want_grads)


def test_frozen_tower_gets_zero_gradient_and_the_rest_is_unchanged():
    model, loss, mesh, params, batch, rng, expected = full_batch_case("clip")
    _, want_grads = expected
    frozen = frozen_mask(params, ["img/.*"])
    value_and_grad = accumulated_contrastive_value_and_grad(model, loss, mesh, 2, frozen=frozen)
    _, got_grads = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(params, batch, rng)
    for leaf in jax.tree.leaves(got_grads["img"]):
        np.testing.assert_array_equal(leaf, 0)
    # Freezing the image tower stops its gradient only: the text tower's and tau's are unchanged.
    assert float(np.abs(want_grads["img"]["head"]["kernel"]).max()) > 0
    trainable = {key: value for key, value in got_grads.items() if key != "img"}
    assert_gradients_close(trainable, {key: want_grads[key] for key in trainable})


def test_with_dropout_both_passes_see_the_same_masks():
    # Pass 2 must recompute exactly the forward that pass 1 evaluated. The reference is autodiff
    # through the same per-microbatch forwards (dropout key fold_in(dropout_rng, m)).
    _, loss, mesh, params, batch, _, _ = full_batch_case("clip")
    model = two_towers(dropout=0.3)  # dropout adds no parameters: the same ones apply
    sharded_loss = shard_loss(loss, mesh, BATCH_AXES)
    accum_steps = 2

    def microbatched_objective(params, rng):
        dropout_rng, loss_rng = jax.random.split(rng)
        parts = []
        for index in range(accum_steps):
            rows = microbatch(batch, index, accum_steps)
            key = jax.random.fold_in(dropout_rng, index)
            parts.append(
                model.apply(
                    {"params": params},
                    rows["image"],
                    rows["text"],
                    train=True,
                    rngs={"dropout": key},
                )
            )
        outputs = jax.tree.map(
            lambda *leaves: (
                leaves[0] if leaves[0].ndim == 0 else merge_microbatches(jnp.stack(leaves))
            ),
            *parts,
        )
        return sharded_loss(outputs, loss_rng)[0]

    reference = jax.jit(jax.value_and_grad(microbatched_objective), compiler_options=FAST_COMPILE)
    rng = jax.random.key(5)
    want_loss, want_grads = reference(params, rng)
    other_loss, _ = reference(params, jax.random.key(6))
    assert float(other_loss) != pytest.approx(float(want_loss), rel=1e-4)  # dropout is active
    value_and_grad = accumulated_contrastive_value_and_grad(model, loss, mesh, accum_steps)
    (got_loss, _), got_grads = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(
        params, batch, rng
    )
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert_gradients_close(got_grads, want_grads)


def test_microbatches_merge_back_to_the_original_row_order():
    batch = {
        "rows": jnp.arange(24),
        "features": jnp.arange(24 * 3, dtype=jnp.float32).reshape(24, 3),
    }
    accum_steps = 3
    parts = [microbatch(batch, index, accum_steps) for index in range(accum_steps)]
    # Strided: microbatch m holds rows m, m + M, m + 2M, ...
    np.testing.assert_array_equal(parts[1]["rows"], np.arange(1, 24, accum_steps))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
    merged = merge_microbatches(stacked)
    for key in batch:
        np.testing.assert_array_equal(merged[key], batch[key])


def test_forming_a_microbatch_moves_no_rows_between_devices():
    mesh = make_mesh({"data": 4, "fsdp": 2})
    rows = batch_sharding(mesh)
    compiled = compile_function(
        lambda images, index: microbatch(images, index, 4),
        jax.ShapeDtypeStruct((BATCH, IMAGE, IMAGE, 3), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
        out_shardings=rows,
    )
    collectives = re.findall(
        r"all-to-all|all-gather|collective-permute|all-reduce", compiled.as_text()
    )
    assert not collectives, collectives


def test_batch_that_does_not_split_over_devices_is_rejected():
    mesh = make_mesh({"data": 8})
    model = two_towers()
    loss = make_loss("clip", **LOSS_OPTIONS["clip"])
    images = jnp.zeros((BATCH, IMAGE, IMAGE, 3))
    texts = jnp.zeros((BATCH, LENGTH), jnp.int32)
    params = jax.eval_shape(lambda key: model.init(key, images, texts)["params"], jax.random.key(0))
    batch = {"image": images, "text": texts}
    # 32 rows make 2 microbatches of 16 (2 per device) but not 8 microbatches of 4 on 8 devices.
    jax.eval_shape(
        accumulated_contrastive_value_and_grad(model, loss, mesh, 2),
        params,
        batch,
        jax.random.key(0),
    )
    value_and_grad = accumulated_contrastive_value_and_grad(model, loss, mesh, 8)
    with pytest.raises(ValueError, match="multiple of accum_steps \\* devices = 64"):
        jax.eval_shape(value_and_grad, params, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="accumulation needs accum_steps >= 2, got 1"):
        accumulated_contrastive_value_and_grad(model, loss, mesh, 1)


def test_accumulation_needs_less_activation_memory():
    # 64 tokens per image: activations, not parameters or the [B, D] outputs, dominate the
    # temporary memory of the full-batch gradient (1: the plain objective's, no accumulation).
    # Temporaries are compared directly: on the CPU backend XLA's peak_memory_in_bytes (what
    # xla_stats.peak_bytes reads first) counts only arguments and outputs.
    mesh = make_mesh({"data": 8})
    model = two_towers(patch=4)
    loss = make_loss("clip", **LOSS_OPTIONS["clip"])
    batch_size, image_size = 64, 32
    rows = batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.float32, sharding=rows
        ),
        "text": jax.ShapeDtypeStruct((batch_size, LENGTH), jnp.int32, sharding=rows),
    }
    param_shapes = jax.eval_shape(
        lambda key: model.init(
            key, jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1, LENGTH), jnp.int32)
        )["params"],
        jax.random.key(0),
    )
    shardings = state_shardings(param_shapes, mesh)
    params = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        param_shapes,
        shardings,
    )
    temp_bytes = {}
    plain = jax.value_and_grad(contrastive_objective(model, loss, mesh), has_aux=True)
    for accum_steps in (1, 4):
        compiled = compile_function(
            plain
            if accum_steps == 1
            else accumulated_contrastive_value_and_grad(model, loss, mesh, accum_steps),
            params,
            batch,
            jax.random.key(0),
            compiler_options=FAST_COMPILE,
        )
        temp_bytes[accum_steps] = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes[4] < 0.5 * temp_bytes[1], temp_bytes
