"""Checkpoint writes that fail (no space left, permission lost, a file size limit): one clear line
naming the directory and the cause, the previous checkpoint intact and restorable, and a
training command that stops with exit status 5 and no traceback."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
from etils import epath

from contrastive.checkpoint import Checkpointer
from contrastive.checkpoint_failures import CheckpointWriteError
from contrastive.experiment import build_experiment
from contrastive.mesh import make_mesh
from contrastive.metric_logging import read_metrics
from contrastive.trainer import train, validate_config
from scripts import terminal
from tests import REPO
from tests.contrastive.test_checkpoint import (
    abstract_state,
    assert_bitwise_equal,
    input_state,
    sharded_state,
    snapshot,
)
from tests.contrastive.test_trainer import contrastive_config
from tests.data.helpers import make_fashion_dir

# Orbax stops waiting for the other writes of a save once one fails; each of those may then
# report "Event loop is closed" when it ends, during whichever test runs then (scripts/terminal.py
# keeps these reports off the terminal).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Orbax writes step 2 under this name until every item is written, then renames it to "2".
STEP_2_TEMPORARY = "2.orbax-checkpoint-tmp"


def os_error(number: int, path) -> OSError:
    return OSError(number, os.strerror(number), str(path))


def failing(method: Callable, number: int, applies: Callable[[epath.Path], bool]) -> Callable:
    """`method` of a path, raising OSError(number) for the paths `applies` to."""

    def write(path, *args, **kwargs):
        if applies(path):
            raise os_error(number, path)
        return method(path, *args, **kwargs)

    return write


def in_step_2(path) -> bool:
    return STEP_2_TEMPORARY in str(path)


class Fault(NamedTuple):
    method: str  # the path method that fails
    number: int  # its errno
    applies: Callable[[epath.Path], bool]  # to which paths
    cause: str  # how the error must name it
    in_background: bool  # written by orbax's background commit when saves are asynchronous


FAULTS = {
    "no_space_for_the_step_directory": Fault(
        "mkdir",
        errno.ENOSPC,
        lambda path: path.name == STEP_2_TEMPORARY,
        "No space left on device [ENOSPC]",
        in_background=False,
    ),
    "permission_lost_on_the_checkpoint_directory": Fault(
        "mkdir",
        errno.EACCES,
        lambda path: path.name == STEP_2_TEMPORARY,
        "Permission denied [EACCES]",
        in_background=False,
    ),
    "no_space_for_the_input_position": Fault(
        "write_bytes", errno.ENOSPC, in_step_2, "No space left on device [ENOSPC]", False
    ),
    "no_space_for_the_metadata": Fault(
        "write_text",
        errno.ENOSPC,
        lambda path: path.name == "metadata" and in_step_2(path),
        "No space left on device [ENOSPC]",
        in_background=True,
    ),
}


def inject(monkeypatch, directory, fault: Fault) -> None:
    """Makes every write of `fault` fail from now on."""
    path_class = type(epath.Path(directory))
    original = getattr(path_class, fault.method)
    monkeypatch.setattr(path_class, fault.method, failing(original, fault.number, fault.applies))


def save_one_good_checkpoint(directory, mesh, async_save=True):
    """Step 1 written and finalized; returns (checkpointer, what step 1 holds). keep=1: a
    failed save that counted as finished would delete step 1."""
    state = sharded_state(mesh, seed=1)
    expected = snapshot(state)
    checkpointer = Checkpointer(directory, keep=1, async_save=async_save)
    checkpointer.save(1, state, input_state(1), {"step": 1})
    checkpointer.wait_until_finished()
    return checkpointer, expected


def assert_step_1_restores_intact(directory, mesh, expected):
    """A new Checkpointer finds step 1 as the latest and restores it verified (checksums, CRC,
    finite values) and bit for bit; the unfinished step 2 is not a step."""
    with Checkpointer(directory) as checkpointer:
        assert checkpointer.all_steps() == [1]
        restored = checkpointer.restore_latest_intact(abstract_state(mesh), report=pytest.fail)
    step, state, position, metadata = restored
    assert step == 1 and metadata == {"step": 1}
    assert_bitwise_equal(state, expected)
    np.testing.assert_array_equal(position, input_state(1))


def assert_clear(error: CheckpointWriteError, directory, cause: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"saving checkpoint 2 to {directory} failed: {cause}")
    assert "the latest intact one is checkpoint 1" in message
    assert error.step == 2 and error.intact == 1


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failed_save_is_one_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, fault, async_save
):
    mesh = make_mesh({"data": 8})
    checkpointer, expected = save_one_good_checkpoint(tmp_path, mesh, async_save)
    inject(monkeypatch, tmp_path, FAULTS[fault])

    def save_step_2():
        return checkpointer.save(2, sharded_state(mesh, seed=2), input_state(2), {"step": 2})

    if async_save and FAULTS[fault].in_background:
        assert save_step_2()  # save() returned; the failure comes from the background commit
        with pytest.raises(CheckpointWriteError) as caught:
            checkpointer.wait_until_finished()
    else:
        with pytest.raises(CheckpointWriteError) as caught:
            save_step_2()
    assert_clear(caught.value, tmp_path, FAULTS[fault].cause)
    checkpointer.close()  # the failure was reported once; closing does not raise it again
    monkeypatch.undo()

    assert_step_1_restores_intact(tmp_path, mesh, expected)


def test_a_background_failure_is_reported_by_the_next_save_under_its_own_step(
    tmp_path, monkeypatch
):
    mesh = make_mesh({"data": 8})
    checkpointer, expected = save_one_good_checkpoint(tmp_path, mesh)
    inject(monkeypatch, tmp_path, FAULTS["no_space_for_the_metadata"])
    assert checkpointer.save(2, sharded_state(mesh, seed=2), input_state(2), {"step": 2})
    with pytest.raises(CheckpointWriteError) as caught:
        checkpointer.save(3, sharded_state(mesh, seed=3), input_state(3), {"step": 3})
    assert_clear(caught.value, tmp_path, FAULTS["no_space_for_the_metadata"].cause)
    assert not (tmp_path / "3.orbax-checkpoint-tmp").exists()  # step 3 was not started
    checkpointer.close()
    monkeypatch.undo()
    assert_step_1_restores_intact(tmp_path, mesh, expected)


def test_a_real_file_size_limit_fails_the_array_write_and_keeps_the_previous_checkpoint(
    tmp_path,
):
    """The operating system refuses the write (RLIMIT_FSIZE: EFBIG, no root needed), inside the
    tensorstore code that writes the arrays; its reason reaches the message."""
    mesh = make_mesh({"data": 8})
    checkpointer, expected = save_one_good_checkpoint(tmp_path, mesh)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a signal
    # Larger than the input position and the metadata, smaller than the array data.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError) as caught:
            checkpointer.save(2, sharded_state(mesh, seed=2), input_state(2), {"step": 2})
            checkpointer.wait_until_finished()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert_clear(caught.value, tmp_path, "File too large [EFBIG]")
    assert "/state.orbax-checkpoint-tmp/" in caught.value.cause  # an array file
    checkpointer.close()
    assert_step_1_restores_intact(tmp_path, mesh, expected)


def test_the_terminal_shows_a_failed_save_as_one_line_and_exit_status_5(capsys, monkeypatch):
    forwarded = []
    monkeypatch.setattr(sys, "unraisablehook", forwarded.append)

    def main():
        raise CheckpointWriteError(6, "/runs/a/checkpoints", "No space left on device [ENOSPC]", 3)

    assert terminal.run(main) == 5
    assert capsys.readouterr().err == (
        "error: saving checkpoint 6 to /runs/a/checkpoints failed: No space left on device "
        "[ENOSPC]; the latest intact one is checkpoint 3. Free space or restore write access "
        "there, then rerun the same command to resume\n"
    )
    # Writes orbax abandoned after the failure report a closed event loop when they end: not
    # shown. Anything else still is.
    closed, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for error in (closed, other):
        sys.unraisablehook(SimpleNamespace(exc_type=RuntimeError, exc_value=error))
    assert [report.exc_value for report in forwarded] == [other]


# Runs scripts.train as a user would, with the JSON metadata write of the second checkpoint
# failing in orbax's background commit (the last write of a save, after save() returned).
TRAIN_WITH_A_FULL_DISK_AT_THE_SECOND_SAVE = """
import errno, os, runpy, sys
from etils import epath
path_class = type(epath.Path("/"))
write_text, metadata_writes = path_class.write_text, []
def write_text_until_the_disk_is_full(path, *args, **kwargs):
    if path.name == "metadata" and "orbax-checkpoint-tmp" in str(path):
        metadata_writes.append(path)
        if len(metadata_writes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write_text(path, *args, **kwargs)
path_class.write_text = write_text_until_the_disk_is_full
sys.argv = ["scripts.train"] + sys.argv[1:]
runpy.run_module("scripts.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # two trainings, one of them a fresh process: about two minutes on two cores
def test_the_training_command_stops_with_one_error_line_and_resumes_afterwards(tmp_path):
    make_fashion_dir(tmp_path / "fashion", n_train=64, n_test=20)
    config = contrastive_config(tmp_path / "fashion", "clip", steps=4)
    config.evals = {}
    config.log_every = 1
    config.checkpoint.update(every_steps=2, keep=1, async_save=True)
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    workdir = tmp_path / "run"
    command = [sys.executable, "-c", TRAIN_WITH_A_FULL_DISK_AT_THE_SECOND_SAVE]
    command += ["--config", str(config_file), "--workdir", str(workdir)]
    # As a user runs it: without the test session's TensorFlow log level.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 5, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    checkpoints = workdir / "checkpoints"
    assert lines[0].startswith(
        f"error: saving checkpoint 4 to {checkpoints} failed: No space left on device [ENOSPC] "
    )
    assert "the latest intact one is checkpoint 2" in lines[0]

    with Checkpointer(checkpoints) as checkpointer:
        assert checkpointer.all_steps() == [2]
        metadata = checkpointer.restore_latest_intact(
            abstract_of_the_run(config), report=pytest.fail
        )[3]
    assert metadata["step"] == 2

    # Space is back: the same run resumes from step 2 and finishes.
    result = train(config, workdir)
    assert result.step == 4
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2, 3, 4]


def abstract_of_the_run(config):
    """The TrainState structure a run of `config` restores into."""
    values = validate_config(config)
    return build_experiment(values, make_mesh(values.get("mesh"))).abstract_state()[0]
