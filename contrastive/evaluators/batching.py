"""Running a jitted function over an evaluation stream on all processes.

Evaluation reads each process's share of a finite split. Shares can end at different batches
and the last batch is usually short, but every process must join every global computation. So
each local batch is padded to a fixed size with mask = False rows, and a process whose share has
ended feeds fully masked batches until all processes are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from contrastive.mesh import batch_sharding


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every array to `size` rows with zeros and add mask bool[size] (True for real rows)."""
    rows = len(next(iter(batch.values())))
    if rows > size:
        raise ValueError(f"a local batch of {rows} rows exceeds the evaluation batch size {size}")
    padded = {
        key: np.concatenate([value, np.zeros((size - rows, *value.shape[1:]), value.dtype)])
        for key, value in batch.items()
        if key != "mask"
    }
    mask = np.asarray(batch.get("mask", np.ones(rows, bool)), bool)
    padded["mask"] = np.concatenate([mask, np.zeros(size - rows, bool)])
    return padded


def global_batches(
    local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, local_size: int
) -> Iterator[dict[str, jax.Array]]:
    """Masked global batches (local_size rows per process) until every process's share ends."""
    iterator = iter(local_batches)
    template = None
    sharding = batch_sharding(mesh)
    while True:
        local = next(iterator, None)
        if local is not None and template is None:
            template = {k: np.zeros_like(v[:0]) for k, v in local.items() if k != "mask"}
        active = np.asarray([local is not None], np.int32)
        if not multihost_utils.process_allgather(active).any():
            return
        if local is None:
            if template is None:
                raise ValueError("this process's evaluation share is empty")
            local = template
        padded = pad_batch(local, local_size)
        yield {
            key: jax.make_array_from_process_local_data(
                sharding, value, (local_size * jax.process_count(), *value.shape[1:])
            )
            for key, value in padded.items()
        }


def map_in_batches(
    fn: Callable[[np.ndarray], jax.Array], inputs: np.ndarray, mesh: Mesh, batch_size: int
) -> np.ndarray:
    """fn over the rows of a host array that every process holds whole, batch by batch.

    Rows are padded to batch_size (a multiple of the device count); returns fn's rows for the
    real inputs, gathered to the host.
    """
    if batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not a multiple of {mesh.size} devices")
    sharding = batch_sharding(mesh)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        rows = len(chunk)
        chunk = np.concatenate(
            [chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)]
        )
        result = fn(jax.device_put(chunk, sharding))
        outputs.append(np.asarray(multihost_utils.process_allgather(result, tiled=True))[:rows])
    return np.concatenate(outputs)
