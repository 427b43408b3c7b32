"""Running a jitted function over an evaluation stream on all processes.

Evaluation reads each process's share of a finite split. Shares can end at different batches
and the last batch is usually short, but every process must join every global computation. So
each local batch is padded to a fixed size with mask = False rows, and a process whose share has
ended feeds fully masked batches until all processes are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
    padded = {key: _pad_rows(value, size) for key, value in batch.items() if key != "mask"}
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


def map_in_batches(fn: Callable[[Any], Any], inputs: Any, mesh: Mesh, batch_size: int) -> Any:
    """fn over the rows of host arrays that every process holds whole, batch by batch.

    inputs is an array or a pytree of arrays with the same number of rows N; each batch of
    batch_size rows (a multiple of the device count; the last one zero-padded) is split over all
    devices of all processes, so the work is shared instead of repeated on every host. Returns
    fn's outputs (an array or pytree with leading dimension batch_size) for the N real rows,
    gathered to every host.
    """
    if batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} is not a multiple of {mesh.size} devices")
    sharding = batch_sharding(mesh)
    leaves, treedef = jax.tree.flatten(inputs)
    num_rows = len(leaves[0]) if leaves else 0
    if num_rows == 0:
        raise ValueError("map_in_batches needs at least one row")
    if any(len(leaf) != num_rows for leaf in leaves):
        raise ValueError(f"inputs have different numbers of rows: {[len(x) for x in leaves]}")
    outputs = []
    for start in range(0, num_rows, batch_size):
        rows = min(batch_size, num_rows - start)
        chunk = [_pad_rows(leaf[start : start + batch_size], batch_size) for leaf in leaves]
        result = fn(jax.device_put(jax.tree.unflatten(treedef, chunk), sharding))
        gathered = multihost_utils.process_allgather(result, tiled=True)
        outputs.append(jax.tree.map(lambda x, rows=rows: np.asarray(x)[:rows], gathered))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(array)
    return np.concatenate([array, np.zeros((size - len(array), *array.shape[1:]), array.dtype)])
