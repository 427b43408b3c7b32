"""Checkpoints that survive preemption: sharded train state, per-process input position, metadata.

One checkpoint per step, written by orbax under `directory/<step>/`:

    state/                        the TrainState (tensorstore/OCDBT), sharded as it was in memory
    input_state/process_<i>-of-<n>.npy
                                  each process's input-iterator position (a small numpy array)
    metadata/metadata             JSON (config, counters, a checksum of every state array)

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when every item of every
process is written, so a crash mid-save leaves only a temporary directory, which `latest_step`
ignores and the next `Checkpointer` on the directory deletes. The input states live inside the
step directory for the same reason: they appear, and are deleted (keep=N), together with the
state they belong to.

Every restore verifies what it read: the checksum recorded for each array when it was written
(contrastive/integrity.py), the input state's CRC, and that every parameter is finite. A step that
fails (or that orbax cannot read at all) raises DamagedCheckpoint; `restore_latest_intact` then
reports it in one line, sets its directory aside as `<step>.damaged` (never deleting it) and
falls back to the next older step.

A save that cannot be written (no space left, permission lost, a bucket refusing writes) raises
CheckpointWriteError naming the step, the directory and the cause, whether it fails while `save`
runs or later in orbax's background commit (then it is raised by the next `save`,
`wait_until_finished` or `close`). Orbax renames a step into place only after every item is
written and deletes old steps (keep=N) only after that, so the previous checkpoint stays intact
and restorable; the unfinished `<step>.orbax-checkpoint-tmp` is removed by the next
`Checkpointer` on the directory.

Typed PRNG keys (`jax.random.key`) are saved and restored by orbax as they are; no unwrapping is
needed.

A trainer uses it as

    checkpointer = Checkpointer(workdir / "checkpoints", keep=3)
    if (step := checkpointer.latest_step()) is not None:
        state, input_state, metadata = checkpointer.restore(step, abstract_state)
    with PreemptionGuard() as guard:
        for step in ...:
            state = train_step(state, batch)     # donates the previous state
            if step % every == 0 or guard.requested:
                checkpointer.save(step, state, iterator_state, {"config": config})
    checkpointer.close()                         # waits for the last save
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from contrastive import storage
from contrastive.integrity import array_checksums, bytes_checksum, differing, nonfinite_arrays
from contrastive.storage import CHECKPOINT_SCHEMES

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
INPUT_STATE_ITEM = "input_state"
METADATA_ITEM = "metadata"


def _input_state_filename(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.npy"


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read or does not match what was written."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint {step} is damaged: {reason}")


class CheckpointWriteError(Exception):
    """A save that failed; the checkpoints finalized before it are untouched."""

    def __init__(self, step: int, directory: str, cause: str, intact: int | None):
        self.step, self.directory, self.cause, self.intact = step, directory, cause, intact
        kept = (
            "no earlier checkpoint could be listed there"
            if intact is None
            else f"the latest intact one is checkpoint {intact}"
        )
        super().__init__(
            f"saving checkpoint {step} to {directory} failed: {cause}; {kept}. Free space or "
            "restore write access there, then rerun the same command to resume"
        )


# Tensorstore (which writes the arrays) reports an operating-system error inside its message:
# ... local file "PATH": ... File too large [os_error_code='27']
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code=\W?(\d+)")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def _write_failure_cause(error: BaseException) -> str:
    """The operating system's reason (e.g. "No space left on device [ENOSPC] (path)") when the
    error chain carries one, else the error's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return _os_reason(seen.errno, seen.filename)
        code = _TENSORSTORE_OS_ERROR.search(str(seen))
        if code:
            path = _TENSORSTORE_FILE.search(str(seen))
            return _os_reason(int(code.group(1)), path.group(1) if path else None)
        seen = seen.__cause__ or seen.__context__
    return _first_line(error)


def _os_reason(number: int, filename: str | None) -> str:
    name = errno.errorcode.get(number, f"errno {number}")
    return f"{os.strerror(number)} [{name}]" + (f" ({filename})" if filename else "")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


@dataclasses.dataclass
class _InputStateSave(ocp.args.CheckpointArgs):
    """This process's input position, or None when the trainer keeps none."""

    array: np.ndarray | None


@dataclasses.dataclass
class _InputStateRestore(ocp.args.CheckpointArgs):
    """Nothing to choose: each process reads its own file."""


class _InputStateHandler(ocp.CheckpointHandler):
    """Every process writes and reads only its own file of the `input_state` item.

    Orbax's built-in handlers write either sharded arrays or one file from the primary process;
    an input position is neither (each process has its own, of its own size). The write is
    synchronous and small, so it is done before `save()` returns and the caller may reuse the
    array afterwards. The process count is part of the file name; a run resumed on a different
    number of processes gets process 0's position, which the input pipeline accepts only where
    the position means the same in both layouts.
    """

    def __init__(self, process_index: int, process_count: int):
        self._filename = _input_state_filename(process_index, process_count)

    def save(self, directory: epath.Path, args: _InputStateSave) -> None:
        if args.array is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, args.array, allow_pickle=False)
        data = buffer.getvalue()
        (directory / self._filename).write_bytes(data)
        (directory / f"{self._filename}.crc32").write_text(str(bytes_checksum(data)))

    def restore(
        self, directory: epath.Path, args: _InputStateRestore | None = None
    ) -> np.ndarray | None:
        path = directory / self._filename
        if path.exists():
            return _load_checked(path)
        others = sorted(p.name for p in directory.iterdir() if p.name.endswith(".npy"))
        first = [name for name in others if name.startswith("process_0-of-")]
        if first:
            # Saved by another number of processes: the pipeline decides whether a position
            # from that layout carries over (it does when every process reads one global
            # order, see data/pipeline.py) and says why not otherwise.
            logger.info(
                "checkpoint %s has input states %s, none named %s; passing %s to the pipeline",
                directory.parent,
                others,
                self._filename,
                first[0],
            )
            return _load_checked(directory / first[0])
        return None


def _load_checked(path: epath.Path) -> np.ndarray:
    data = path.read_bytes()
    crc_path = path.parent / f"{path.name}.crc32"
    if crc_path.exists() and int(crc_path.read_text()) != bytes_checksum(data):
        raise ValueError(f"input state {path.name} does not match the CRC written with it")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _verify(step: int, recorded: dict, actual: dict, params: Any) -> None:
    """Raises DamagedCheckpoint unless the arrays match their checksums and params are finite."""
    bad = differing(recorded, actual)
    if bad:
        raise DamagedCheckpoint(
            step, f"{len(bad)} array(s) differ from the checksums written with them, e.g. {bad[0]}"
        )
    nonfinite = nonfinite_arrays(params)
    if nonfinite:
        raise DamagedCheckpoint(
            step, f"non-finite parameters in {len(nonfinite)} array(s), e.g. {nonfinite[0]}"
        )


def _abstract_leaf(path: Any, leaf: Any) -> jax.ShapeDtypeStruct:
    """A restore target with a sharding; concrete arrays give their own shape and sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
        return leaf
    raise ValueError(
        f"restore target {jax.tree_util.keystr(path)} is {leaf!r}; every leaf must be a jax.Array "
        "or a jax.ShapeDtypeStruct with a sharding, so that it is restored straight into place"
    )


class Checkpointer:
    """Saves and restores (train state, per-process input state, JSON metadata) by step.

    directory: a local path, gs://... or s3://... (where orbax's tensorstore writes arrays),
      shared by all processes.
    keep: how many of the most recent checkpoints to keep; older ones are deleted whole.
    async_save: write in a background thread; `save()` returns once the state is copied to host.
    process_index, process_count: which input-state file is this process's; default
      jax.process_index() and jax.process_count() (set them only to simulate processes).

    All processes must call `save`, `restore` and `close` together (they are collective).
    """

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        async_save: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        directory = storage.absolute(directory)
        if storage.is_remote(directory) and not directory.startswith(CHECKPOINT_SCHEMES):
            raise ValueError(
                f"checkpoints cannot be written to {directory}: orbax stores arrays on local "
                f"disks or under {' or '.join(CHECKPOINT_SCHEMES)}; set checkpoint.directory"
            )
        self.directory = epath.Path(directory)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")

        state_handler = ocp.StandardCheckpointHandler()
        input_handler = _InputStateHandler(process_index, process_count)
        metadata_handler = ocp.JsonCheckpointHandler()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
        registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
        registry.add(INPUT_STATE_ITEM, _InputStateSave, input_handler)
        registry.add(INPUT_STATE_ITEM, _InputStateRestore, input_handler)
        registry.add(METADATA_ITEM, ocp.args.JsonSave, metadata_handler)
        registry.add(METADATA_ITEM, ocp.args.JsonRestore, metadata_handler)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            # Temporary directories left by a crash mid-save are never finalized; remove them.
            cleanup_tmp_directories=True,
            # Orbax's default creates a step's directories in the background; when that fails
            # (no space, no permission) the save waits for them until its coordination timeout
            # (minutes) instead of failing. Created in `save`, a failure is raised at once.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        # The step whose save started last and has not been seen to finish: a failure of
        # orbax's background commit is reported under its number.
        self._unconfirmed_step: int | None = None

    def save(
        self,
        step: int,
        state: Any,
        input_state: np.ndarray | None = None,
        metadata: dict | None = None,
    ) -> bool:
        """Starts writing checkpoint `step`; returns False (writes nothing) if it already exists.

        Waits for the previous save to finish first. On return the caller may donate or modify
        `state`, `input_state` and `metadata`: nothing of them is read later. Raises
        CheckpointWriteError when this save, or the previous one's background commit, failed.

        Why no copy of `state` is made: orbax's save returns only after its blocking phase,
        which copies every jax.Array to host memory and waits for the copies (orbax's default
        device-to-host transfer priority is synchronous; it is deferred to the background
        thread only under a `save_device_host_concurrent_gb` limit with a non-synchronous key
        priority, which we do not configure). The background thread writes those host copies,
        so the next train step may donate the state's buffers. The price is host memory for
        this process's share of the state while a save is in flight, instead of a second copy
        in device memory.
        """
        if input_state is not None and not isinstance(input_state, np.ndarray):
            raise TypeError(f"input_state must be a numpy array, got {type(input_state)}")
        # The previous save's failure is reported under its own step, not this one's.
        self.wait_until_finished()
        # A JSON snapshot: orbax serializes JSON in its background thread, so the caller's dict
        # must not be shared with it; this also reports unserializable values here, not later.
        metadata_snapshot = json.loads(json.dumps(metadata or {}))
        # Computed on the devices before the save starts, so the state's buffers may then be
        # donated (a collective: every process calls save).
        metadata_snapshot["integrity"] = {"state": array_checksums(state)}
        if step in self._manager.all_steps():
            logger.info(
                "checkpoint %d already exists in %s; not saving it again", step, self.directory
            )
            return False
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.StandardSave(state),
                INPUT_STATE_ITEM: _InputStateSave(input_state),
                METADATA_ITEM: ocp.args.JsonSave(metadata_snapshot),
            }
        )
        self._unconfirmed_step = step
        with self._write_failures_reported():
            # force: every call saves; how often to save is the trainer's decision.
            return self._manager.save(step, args=args, force=True)

    def all_steps(self) -> list[int]:
        """Steps whose checkpoint is finalized on disk, ascending (in-flight saves excluded)."""
        # Orbax's own step list includes a save from the moment it starts; the directory holds a
        # step only once it was renamed from its temporary name, i.e. fully written.
        return sorted(ocp.step.checkpoint_steps(self.directory))

    def latest_step(self) -> int | None:
        """The newest finalized step, or None. Processes agree when no save is in flight."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, np.ndarray | None, dict]:
        """(state, this process's input state or None, metadata) of finalized checkpoint `step`.

        abstract_state: the state's structure with jax.ShapeDtypeStruct leaves carrying
          shardings (e.g. from jax.eval_shape plus mesh.state_shardings), or a concrete state.
          Arrays are read straight into those shardings, whatever mesh the checkpoint was
          saved from.
        """
        self._require_finalized(step)
        target = jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardRestore(target),
                        INPUT_STATE_ITEM: _InputStateRestore(),
                        METADATA_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
            state, metadata = restored[STATE_ITEM], dict(restored[METADATA_ITEM])
        except Exception as error:  # noqa: BLE001 - whatever orbax hit reading it
            raise DamagedCheckpoint(step, _first_line(error)) from error
        recorded = (metadata.pop("integrity", None) or {}).get("state") or {}
        _verify(step, recorded, array_checksums(state), getattr(state, "params", state))
        return state, restored[INPUT_STATE_ITEM], metadata

    def restore_latest_intact(
        self, abstract_state: Any, report=logger.warning
    ) -> tuple[int, Any, np.ndarray | None, dict] | None:
        """(step, state, input state, metadata) of the newest checkpoint that restores and
        verifies, or None when there is no checkpoint at all.

        Each damaged newer step is reported (one line through `report`) and moved aside to
        `<step>.damaged`, kept for inspection. Raises DamagedCheckpoint when every step is
        damaged.
        """
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except DamagedCheckpoint as damage:
                report(f"{damage}; set aside as {step}.damaged, trying an older one")
                damaged.append(damage)
                self._set_aside(step)
        if damaged:
            raise DamagedCheckpoint(
                damaged[-1].step,
                f"no intact checkpoint left in {self.directory} (every step failed; the "
                "damaged ones are kept as <step>.damaged). Start over in a new workdir",
            )
        return None

    def _set_aside(self, step: int) -> None:
        """Renames the step's directory to <step>.damaged (the primary process does it)."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.damaged"
            suffix = 1
            while target.exists():
                target = self.directory / f"{step}.damaged-{suffix}"
                suffix += 1
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of finalized checkpoint `step` (no optimizer state, no input
        position): what evaluation needs, read straight into abstract_params' shardings."""
        self._require_finalized(step)
        target = {"params": jax.tree_util.tree_map_with_path(_abstract_leaf, abstract_params)}
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(step) / STATE_ITEM,
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
            metadata = self._manager.restore(
                step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
            )[METADATA_ITEM]
        except Exception as error:  # noqa: BLE001
            raise DamagedCheckpoint(step, _first_line(error)) from error
        params = restored["params"]
        recorded = (metadata.get("integrity") or {}).get("state") or {}
        # The state's paths start with ".params" (a TrainState attribute).
        actual = {f".params{path}": value for path, value in array_checksums(params).items()}
        _verify(step, recorded, actual, params)
        return params

    def _require_finalized(self, step: int) -> None:
        """Waits for the save in flight; raises FileNotFoundError unless `step` is on disk."""
        self.wait_until_finished()
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no finalized checkpoint for step {step} in {self.directory}; "
                f"available: {self.all_steps()}"
            )

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight (if any) is finalized and old steps are deleted;
        raises CheckpointWriteError if it failed."""
        with self._write_failures_reported():
            self._manager.wait_until_finished()
        self._unconfirmed_step = None

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads; raises
        CheckpointWriteError if that save failed."""
        with self._write_failures_reported():
            self._manager.close()
        self._unconfirmed_step = None

    @contextlib.contextmanager
    def _write_failures_reported(self):
        """Turns any failure of orbax's write of the unconfirmed step into CheckpointWriteError."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - whatever the storage or orbax raised
            if self._unconfirmed_step is None:
                raise
            step, self._unconfirmed_step = self._unconfirmed_step, None
            try:
                intact = self.latest_step()
            except OSError:  # the directory itself is no longer readable
                intact = None
            raise CheckpointWriteError(
                step, str(self.directory), _write_failure_cause(error), intact
            ) from error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM (and, with catch_sigint, Ctrl-C) into a flag the train loop polls.

    Cluster schedulers send SIGTERM some seconds before killing a job. The handler only sets a
    flag, because a signal handler runs between two bytecodes of the main thread, possibly in
    the middle of a train step or a save; the loop checks `requested` after each step, saves and
    stops. On exit the previous handlers are restored. Must be entered in the main thread.

    With several processes the signal may reach them at different steps while `save` is
    collective: combine the flags across processes first (e.g. with
    jax.experimental.multihost_utils.process_allgather) and act on their any().
    """

    def __init__(self, catch_sigint: bool = False):
        self._signals = (signal.SIGTERM, signal.SIGINT) if catch_sigint else (signal.SIGTERM,)
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived inside the context."""
        return self._event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_number = signum
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
