"""Checkpoints on 8 simulated devices: exact round trips (typed PRNG key included), restoring into
another mesh layout, keep-N, ignoring unfinalized saves, async saves racing buffer donation,
per-process input states, and the preemption signal guard."""

import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive.checkpoint import Checkpointer
from contrastive.mesh import make_mesh, state_shardings
from contrastive.preemption import PreemptionGuard
from contrastive.step import TrainState

MIN_FSDP_SIZE = 16  # small enough that the test parameters are split over "fsdp"
OPTIMIZER = optax.adam(1e-3)


def build_state(seed):
    """A TrainState with random params and non-zero Adam moments (one update applied)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "kernel": jax.random.normal(keys[0], (64, 32)),
        "bias": jax.random.normal(keys[1], (32,)),
        "embedding": jax.random.normal(keys[2], (16, 8), jnp.bfloat16),
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = OPTIMIZER.update(grads, OPTIMIZER.init(params), params)
    return TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=keys[3],
        nonfinite_in_a_row=jnp.asarray(2, jnp.int32),
        nonfinite_updates=jnp.asarray(5, jnp.int32),
    )


def sharded_state(mesh, seed=0):
    state = build_state(seed)
    return jax.device_put(state, state_shardings(state, mesh, MIN_FSDP_SIZE))


def abstract_state(mesh):
    """What a trainer restores into: shapes from eval_shape, shardings for `mesh`."""
    shapes = jax.eval_shape(build_state, 0)
    shardings = state_shardings(shapes, mesh, MIN_FSDP_SIZE)
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def host_bytes(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).tobytes()


def snapshot(state):
    """Host copy of every leaf's dtype, shape and bytes, independent of the device buffers."""
    return jax.tree.map(lambda leaf: (str(leaf.dtype), leaf.shape, host_bytes(leaf)), state)


def assert_bitwise_equal(state, expected_snapshot):
    assert jax.tree.structure(snapshot(state)) == jax.tree.structure(expected_snapshot)
    for got, want in zip(
        jax.tree.leaves(snapshot(state), is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(expected_snapshot, is_leaf=lambda x: isinstance(x, tuple)),
        strict=True,
    ):
        assert got == want


def input_state(seed, size=3000):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def test_round_trip_is_bitwise_exact_in_a_new_checkpointer(tmp_path):
    mesh = make_mesh({"data": 8})
    state = sharded_state(mesh, seed=5)
    expected = snapshot(state)
    metadata = {"config": {"lr": 1e-3, "towers": ["vit", "text"]}, "examples_seen": 12345}
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.save(5, state, input_state(0), metadata)

    restarted = Checkpointer(tmp_path)
    assert restarted.latest_step() == 5
    target = abstract_state(mesh)
    restored, restored_input, restored_metadata = restarted.restore(5, target)
    restarted.close()

    assert isinstance(restored, TrainState)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert_bitwise_equal(restored, expected)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding
    assert restored_input.dtype == np.uint8
    np.testing.assert_array_equal(restored_input, input_state(0))
    assert restored_metadata == metadata
    # The typed key is usable as a key after the round trip.
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.fold_in(restored.rng, 3)),
        jax.random.key_data(jax.random.fold_in(state.rng, 3)),
    )


def test_restores_into_a_different_mesh_layout(tmp_path):
    saved_from = make_mesh({"data": 8})
    state = sharded_state(saved_from, seed=1)
    expected = snapshot(state)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)

    restore_into = make_mesh({"data": 4, "fsdp": 2})
    target = abstract_state(restore_into)
    assert target.params["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    with Checkpointer(tmp_path) as checkpointer:
        restored, restored_input, restored_metadata = checkpointer.restore(1, target)

    assert_bitwise_equal(restored, expected)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding
    kernel_shards = restored.params["kernel"].addressable_shards
    assert {shard.data.shape for shard in kernel_shards} == {(32, 32)}
    assert restored_input is None
    assert restored_metadata == {}


def test_keeps_the_last_n_steps_with_their_input_states(tmp_path):
    mesh = make_mesh({"data": 8})
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        for step in range(1, 5):
            checkpointer.save(step, sharded_state(mesh, seed=step), input_state(step))
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [3, 4]

        assert not (tmp_path / "1").exists() and not (tmp_path / "2").exists()
        input_files = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/input_state/*.npy"))
        assert [str(p) for p in input_files] == [
            "3/input_state/process_0-of-1.npy",
            "4/input_state/process_0-of-1.npy",
        ]
        _, restored_input, _ = checkpointer.restore(3, abstract_state(mesh))
        np.testing.assert_array_equal(restored_input, input_state(3))
        with pytest.raises(FileNotFoundError, match="available: \\[3, 4\\]"):
            checkpointer.restore(1, abstract_state(mesh))


def test_latest_step_ignores_a_checkpoint_that_was_never_finalized(tmp_path):
    mesh = make_mesh({"data": 8})
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, sharded_state(mesh, seed=1))
    # A crash mid-save leaves the step under orbax's temporary name, never renamed to "2";
    # simulate one with a partial copy (the state item's data removed).
    unfinalized = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", unfinalized)
    shutil.rmtree(unfinalized / "state" / "d", ignore_errors=True)

    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.latest_step() == 1
    assert checkpointer.all_steps() == [1]
    with pytest.raises(FileNotFoundError):
        checkpointer.restore(2, abstract_state(mesh))

    # Step 2 can be written again; the leftover temporary directory is gone.
    state = sharded_state(mesh, seed=2)
    expected = snapshot(state)
    assert checkpointer.save(2, state)
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step() == 2
    assert not unfinalized.exists()
    restored, _, _ = checkpointer.restore(2, abstract_state(mesh))
    assert_bitwise_equal(restored, expected)
    checkpointer.close()


def test_async_save_is_not_corrupted_by_donating_or_mutating_the_inputs(tmp_path):
    mesh = make_mesh({"data": 4, "fsdp": 2})
    state = sharded_state(mesh, seed=3)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    expected = snapshot(state)
    position = input_state(3)
    metadata = {"counters": {"examples": 10}}

    def next_state(state):
        return state.replace(
            step=state.step + 1,
            params=jax.tree.map(lambda p: p * 0 + 7, state.params),
            opt_state=jax.tree.map(lambda m: m * 0 - 1, state.opt_state),
        )

    # Compiled before the save so that the donation follows save() immediately.
    donating_step = (
        jax.jit(next_state, in_shardings=(shardings,), out_shardings=shardings, donate_argnums=0)
        .lower(state)
        .compile()
    )
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(3, state, position, metadata)
    new_state = donating_step(state)
    # Whatever the backend did not donate is deleted: nothing of the old buffers may be read.
    for leaf in jax.tree.leaves(state):
        if not leaf.is_deleted():
            leaf.delete()
    position[:] = 0
    metadata["counters"]["examples"] = -1
    jax.block_until_ready(new_state)
    checkpointer.wait_until_finished()

    restored, restored_input, restored_metadata = checkpointer.restore(3, abstract_state(mesh))
    checkpointer.close()
    assert_bitwise_equal(restored, expected)
    np.testing.assert_array_equal(restored_input, input_state(3))
    assert restored_metadata == {"counters": {"examples": 10}}


def test_each_process_restores_its_own_input_state(tmp_path, caplog):
    mesh = make_mesh({"data": 8})
    state = sharded_state(mesh)
    # Two processes sharing a filesystem, simulated: each writes its file into its own step
    # directory, then process 1's file is put where it would have been written.
    with Checkpointer(tmp_path / "shared", process_index=0, process_count=2) as first:
        first.save(7, state, input_state(0, size=100))
    with Checkpointer(tmp_path / "other", process_index=1, process_count=2) as second:
        second.save(7, state, input_state(1, size=200))
    shutil.copy(
        tmp_path / "other/7/input_state/process_1-of-2.npy",
        tmp_path / "shared/7/input_state/process_1-of-2.npy",
    )

    target = abstract_state(mesh)
    with Checkpointer(tmp_path / "shared") as reader:
        params = reader.restore_params(7, target.params)
    assert_bitwise_equal(params, snapshot(state.params))
    for process_index in (0, 1):
        with Checkpointer(tmp_path / "shared", process_index=process_index, process_count=2) as c:
            _, restored_input, _ = c.restore(7, target)
        np.testing.assert_array_equal(
            restored_input, input_state(process_index, size=100 * (1 + process_index))
        )

    # Resumed on one process: it gets process 0's position of the two-process run (the input
    # pipeline decides whether that position carries over to the new layout).
    with caplog.at_level(logging.INFO, logger="contrastive.checkpoint"):
        with Checkpointer(tmp_path / "shared", process_index=0, process_count=1) as alone:
            _, restored_input, _ = alone.restore(7, target)
    np.testing.assert_array_equal(restored_input, input_state(0, size=100))
    assert "process_0-of-1.npy" in caplog.text


def test_rejects_bad_inputs_before_writing_anything(tmp_path):
    mesh = make_mesh({"data": 8})
    state = sharded_state(mesh)
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(TypeError, match="not JSON serializable"):
            checkpointer.save(1, state, metadata={"loss": np.float32(1.0)})
        with pytest.raises(TypeError, match="numpy array"):
            checkpointer.save(1, state, input_state=b"position")
        assert checkpointer.all_steps() == []

        assert checkpointer.save(1, state)
        assert not checkpointer.save(1, state)  # already saved: left as it is
        checkpointer.wait_until_finished()
        unsharded = jax.eval_shape(build_state, 0)
        with pytest.raises(ValueError, match="with a sharding"):
            checkpointer.restore(1, unsharded)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def wait_for(condition, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_preemption_guard_turns_sigterm_into_a_flag_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: guard.requested)
        assert guard.signal_number == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_guard_optionally_catches_sigint_and_restores_on_error():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(RuntimeError, match="loop failed"):
        with PreemptionGuard(catch_sigint=True) as guard:
            os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
            assert wait_for(lambda: guard.requested)
            assert guard.signal_number == signal.SIGINT
            raise RuntimeError("loop failed")
    assert {s: signal.getsignal(s) for s in previous} == previous
