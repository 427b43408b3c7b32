"""Damaged checkpoints: each damage mode is detected, reported in one line naming the step, set
aside (never deleted), and the newest intact checkpoint is restored instead."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.checkpoint import Checkpointer
from contrastive.checkpoint_failures import DamagedCheckpoint
from contrastive.integrity import array_checksums, differing
from contrastive.mesh import make_mesh
from tests.contrastive.test_checkpoint import (
    abstract_state,
    assert_bitwise_equal,
    build_state,
    input_state,
    sharded_state,
    snapshot,
)


def data_files(root):
    return sorted(p for p in (root / "state").rglob("d/*") if p.is_file())


def flip_a_byte(root):
    """Flips one bit in the middle of every array data file of the state item."""
    for path in data_files(root):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def truncate_array_data(root):
    for path in data_files(root):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def arrays_of_another_step(root):
    """Array data that reads without error but is not what this step wrote (silent damage)."""
    shutil.rmtree(root / "state")
    shutil.copytree(root.parent / "1" / "state", root / "state")


def garbage_metadata(root):
    (root / "metadata" / "metadata").write_text("{not json")


def empty_metadata(root):
    (root / "metadata" / "metadata").write_text("")


def truncate_input_state(root):
    path = next((root / "input_state").glob("*.npy"))
    path.write_bytes(path.read_bytes()[:40])


def remove_state_item(root):
    shutil.rmtree(root / "state")


DAMAGE = {
    "flipped_bytes": flip_a_byte,
    "arrays_of_another_step": arrays_of_another_step,
    "truncated_array_data": truncate_array_data,
    "garbage_metadata": garbage_metadata,
    "empty_metadata": empty_metadata,
    "truncated_input_state": truncate_input_state,
    "missing_state_item": remove_state_item,
}


@pytest.fixture
def two_checkpoints(tmp_path):
    mesh = make_mesh({"data": 8})
    states = {step: sharded_state(mesh, seed=step) for step in (1, 2)}
    expected = {step: snapshot(state) for step, state in states.items()}
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        for step, state in states.items():
            checkpointer.save(step, state, input_state(step), {"step": step})
    return tmp_path, mesh, expected


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, damage):
    directory, mesh, expected = two_checkpoints
    DAMAGE[damage](directory / "2")
    reports = []
    with Checkpointer(directory) as checkpointer:
        with pytest.raises(DamagedCheckpoint, match="checkpoint 2 is damaged"):
            checkpointer.restore(2, abstract_state(mesh))
        step, state, position, metadata = checkpointer.restore_latest_intact(
            abstract_state(mesh), report=reports.append
        )
        assert checkpointer.all_steps() == [1]
    assert step == 1 and metadata == {"step": 1}
    assert_bitwise_equal(state, expected[1])
    np.testing.assert_array_equal(position, input_state(1))
    assert len(reports) == 1 and reports[0].startswith("checkpoint 2 is damaged: ")
    assert "\n" not in reports[0] and "set aside as 2.damaged" in reports[0]
    assert (directory / "2.damaged").is_dir()  # kept for inspection


def test_without_any_intact_checkpoint_the_error_says_so(two_checkpoints):
    directory, mesh, _ = two_checkpoints
    flip_a_byte(directory / "1")
    flip_a_byte(directory / "2")
    with Checkpointer(directory) as checkpointer:
        with pytest.raises(DamagedCheckpoint, match="no intact checkpoint left"):
            checkpointer.restore_latest_intact(abstract_state(mesh), report=lambda line: None)
    assert (directory / "1.damaged").is_dir() and (directory / "2.damaged").is_dir()


def test_non_finite_parameters_are_refused_even_with_matching_checksums(tmp_path):
    mesh = make_mesh({"data": 8})
    state = sharded_state(mesh, seed=3)
    state = state.replace(params={**state.params, "bias": state.params["bias"].at[4].set(jnp.nan)})
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)
        with pytest.raises(DamagedCheckpoint, match=r"non-finite parameters .*\['bias'\]"):
            checkpointer.restore(1, abstract_state(mesh))


def test_parameters_only_restores_are_verified_too(two_checkpoints):
    directory, mesh, expected = two_checkpoints
    flip_a_byte(directory / "2")
    abstract_params = abstract_state(mesh).params
    with Checkpointer(directory) as checkpointer:
        params = checkpointer.restore_params(1, abstract_params)
        with pytest.raises(DamagedCheckpoint, match="checkpoint 2 is damaged"):
            checkpointer.restore_params(2, abstract_params)
    assert np.asarray(params["kernel"]).tobytes() == expected[1].params["kernel"][2]


def reference_checksum(array: np.ndarray) -> int:
    """The checksum written out in numpy: sum of bits * (position * 2654435761 | 1) mod 2^32."""
    bits = array.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[array.itemsize]).astype(np.uint64)
    position = np.arange(array.size, dtype=np.uint64).reshape(array.shape)
    multiplier = ((position * 2654435761) % 2**32) | 1
    return int(np.sum((bits * multiplier) % 2**32) % 2**32)


def test_checksums_match_numpy_and_do_not_depend_on_the_sharding():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(64, 32)).astype(np.float32),
        "bf16": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
        "i32": rng.integers(-5, 5, (7,)).astype(np.int32),
    }
    expected = {
        "['f32']": reference_checksum(tree["f32"]),
        "['bf16']": reference_checksum(np.asarray(tree["bf16"])),
        "['i32']": reference_checksum(tree["i32"]),
    }
    assert array_checksums(tree) == expected
    mesh = make_mesh({"data": 4, "fsdp": 2})
    sharded = jax.device_put(
        tree["f32"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp"))
    )
    assert array_checksums({"f32": sharded})["['f32']"] == expected["['f32']"]
    # One flipped bit, or two swapped elements, change it.
    flipped = tree["f32"].copy()
    flipped.view(np.uint32)[3, 5] ^= 1
    swapped = tree["f32"].copy()
    swapped[0, 0], swapped[0, 1] = tree["f32"][0, 1], tree["f32"][0, 0]
    for changed in (flipped, swapped):
        assert differing(expected, array_checksums({"f32": changed})) == ["['f32']"]


def test_checkpoints_record_one_checksum_per_array(two_checkpoints):
    directory, _, _ = two_checkpoints
    recorded = json.loads((directory / "1" / "metadata" / "metadata").read_text())
    expected = array_checksums(build_state(1))
    assert recorded["integrity"]["state"] == expected
