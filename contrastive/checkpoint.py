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

The input-state item is contrastive/checkpoint_input_state.py, the two errors and the checks of
what a restore read are contrastive/checkpoint_failures.py, and PreemptionGuard (the signal
flag below) is contrastive/preemption.py.

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
import functools
import json
import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # not exported in 0.12

from contrastive import storage
from contrastive.checkpoint_failures import (
    CheckpointWriteError,
    DamagedCheckpoint,
    first_line,
    verify,
    write_failure_cause,
)
from contrastive.checkpoint_input_state import InputStateHandler, InputStateRestore, InputStateSave
from contrastive.integrity import array_checksums
from contrastive.storage import CHECKPOINT_SCHEMES

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
INPUT_STATE_ITEM = "input_state"
METADATA_ITEM = "metadata"

# Orbax writes an array that several devices hold ("replica-parallel") as one slice per replica,
# each cut by its own eager jax op. That spreads a large array's write over the hosts of a pod;
# for a small one, cutting costs more than writing it whole (a tiny model's ~100 arrays on 8
# devices took about a second of CPU per save). Arrays under this size are written whole.
MIN_REPLICA_PARALLEL_BYTES = 1 << 20


@functools.cache  # orbax's handler registry is global: once per process is enough
def _write_small_arrays_whole() -> None:
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_BYTES,
            # Orbax's default handler keeps per-array metadata in this store too.
            array_metadata_store=array_metadata_store.Store(),
        ),
        override=True,
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

        _write_small_arrays_whole()
        state_handler = ocp.StandardCheckpointHandler()
        input_handler = InputStateHandler(process_index, process_count)
        metadata_handler = ocp.JsonCheckpointHandler()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
        registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
        registry.add(INPUT_STATE_ITEM, InputStateSave, input_handler)
        registry.add(INPUT_STATE_ITEM, InputStateRestore, input_handler)
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
                INPUT_STATE_ITEM: InputStateSave(input_state),
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
                        INPUT_STATE_ITEM: InputStateRestore(),
                        METADATA_ITEM: ocp.args.JsonRestore(),
                    }
                ),
            )
            state, metadata = restored[STATE_ITEM], dict(restored[METADATA_ITEM])
        except Exception as error:  # noqa: BLE001 - whatever orbax hit reading it
            raise DamagedCheckpoint(step, first_line(error)) from error
        recorded = (metadata.pop("integrity", None) or {}).get("state") or {}
        verify(step, recorded, array_checksums(state), getattr(state, "params", state))
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
            raise DamagedCheckpoint(step, first_line(error)) from error
        params = restored["params"]
        recorded = (metadata.get("integrity") or {}).get("state") or {}
        # The state's paths start with ".params" (a TrainState attribute).
        actual = {f".params{path}": value for path, value in array_checksums(params).items()}
        verify(step, recorded, actual, params)
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
                step, str(self.directory), write_failure_cause(error), intact
            ) from error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
