"""The `input_state` item of a checkpoint: each process's input-iterator position.

Under a step directory, `input_state/process_<i>-of-<n>.npy` holds process i's position (a small
numpy array) and `process_<i>-of-<n>.npy.crc32` its CRC, checked when it is read back.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from contrastive.integrity import bytes_checksum

# The checkpointer's logger: a restore reports what it read in one place.
logger = logging.getLogger("contrastive.checkpoint")


def _input_state_filename(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.npy"


@dataclasses.dataclass
class InputStateSave(ocp.args.CheckpointArgs):
    """This process's input position, or None when the trainer keeps none."""

    array: np.ndarray | None


@dataclasses.dataclass
class InputStateRestore(ocp.args.CheckpointArgs):
    """Nothing to choose: each process reads its own file."""


class InputStateHandler(ocp.CheckpointHandler):
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

    def save(self, directory: epath.Path, args: InputStateSave) -> None:
        if args.array is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, args.array, allow_pickle=False)
        data = buffer.getvalue()
        (directory / self._filename).write_bytes(data)
        (directory / f"{self._filename}.crc32").write_text(str(bytes_checksum(data)))

    def restore(
        self, directory: epath.Path, args: InputStateRestore | None = None
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
