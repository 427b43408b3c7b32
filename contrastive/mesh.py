"""Device mesh and parameter sharding.

The mesh has a data axis and an optional FSDP axis. Devices are laid out by JAX's topology-aware
helper (mesh_utils), so neighbouring mesh positions are neighbours on the TPU torus or GPU
island; on a multi-slice job (devices with several `slice_index` values) the data axis spans
the slices over the data-centre network while FSDP stays inside a slice on the fast
interconnect (a hybrid mesh), so the only traffic between slices is the gradient all-reduce.

The global batch is split over both axes (every device sees different examples); parameters and
optimizer state are replicated over "data" and, when the "fsdp" axis has more than one device,
split over it along their largest divisible dimension (ZeRO-3 style: XLA gathers each weight
where it is used and reduce-scatters its gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.config_blocks import defaults, either, int_at_least, one_of, setting

BATCH_AXES = ("data", "fsdp")
_AXIS_SIZE = either(one_of([-1]), int_at_least(1), "expected an integer >= 1, or -1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The config's `mesh` block: devices along each axis; one may be -1 (all remaining)."""

    data: int = setting(-1, _AXIS_SIZE)
    fsdp: int = setting(1, _AXIS_SIZE)

    def problems(self) -> list[str]:
        if self.data == -1 and self.fsdp == -1:
            return ["fsdp: only one of data, fsdp may be -1"]
        return []


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh; one size may be -1 (all remaining devices). Default: all data."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {**defaults(MeshConfig), **dict(axis_sizes or {})}
    unknown = set(sizes) - set(BATCH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {BATCH_AXES}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not split into mesh sizes {sizes}")
        sizes[free[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh sizes {sizes} do not multiply to the {len(devices)} devices")
    shape = tuple(sizes[name] for name in BATCH_AXES)
    return Mesh(device_grid(shape, devices), BATCH_AXES)


def device_grid(shape: tuple[int, int], devices) -> np.ndarray:
    """Devices arranged as (data, fsdp), topology-aware; hybrid when there are several slices."""
    slices = sorted({getattr(device, "slice_index", 0) for device in devices})
    if len(slices) > 1:
        data, fsdp = shape
        if data % len(slices):
            raise ValueError(
                f"the data axis ({data}) must be a multiple of the {len(slices)} slices: FSDP "
                "stays inside a slice, data parallelism spans them"
            )
        return mesh_utils.create_hybrid_device_mesh(
            (data // len(slices), fsdp), (len(slices), 1), devices
        )
    if len(devices) == 1:
        return np.asarray(devices).reshape(shape)
    return mesh_utils.create_device_mesh(shape, devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all mesh axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**12) -> PartitionSpec:
    """Split the largest dimension divisible by the FSDP size; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(state_shapes, mesh: Mesh, min_fsdp_size: int = 2**12):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state):
    arrays of at least min_fsdp_size elements are split over "fsdp" (see fsdp_spec)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, min_fsdp_size)),
        state_shapes,
    )
