"""Images sent to the devices as uint8 and scaled to their float range there.

A training batch of float32 images moves 4 bytes per pixel from host to device; the same image
as uint8 moves 1. When an op string's last image op is `value_range(vmin, vmax)` from the
default input range 0..255 without clipping, the host runs the op string without that op and
rounds the image to uint8 (`to_uint8`), and `DeviceValueRange` maps it to [vmin, vmax] inside the
jitted step. The result is within half a uint8 step, (vmax - vmin) / 255 / 2, of the float
pipeline's image, and bit-identical when the image was integral before value_range (no resize or
crop with interpolation): the device looks each value up in a 256-entry table that the host
computes with value_range's float32 arithmetic. (Computing the formula on the device would not
be bit-exact: XLA turns the division into a multiplication by the reciprocal and fuses
multiply-adds.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data.ops import PP_OPS
from data.preprocess import PreprocessFn, bound_arguments

IMAGE_KEY = "image"


@dataclasses.dataclass(frozen=True)
class DeviceValueRange:
    """batch -> batch with "image" (uint8 [B, H, W, 3]) mapped linearly from
    [in_min, in_max] to float32 [vmin, vmax]; a pure jax.numpy function for the jitted step."""

    vmin: float
    vmax: float
    in_min: float = 0.0
    in_max: float = 255.0

    def table(self) -> np.ndarray:
        """float32 [256]: value_range's output for each uint8 value, operation by operation in
        float32 as the op computes it (numpy and TF round each operation alike)."""
        values = np.arange(256, dtype=np.float32)
        scaled = (values - np.float32(self.in_min)) / np.float32(self.in_max - self.in_min)
        return scaled * np.float32(self.vmax - self.vmin) + np.float32(self.vmin)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = jnp.asarray(batch[IMAGE_KEY])
        # uint8 indices never leave the table ("clip" spares the masking of "fill"); the output
        # is sharded like the image, which explicit-sharding meshes need to be told.
        scaled = (
            jnp.asarray(self.table())
            .at[image]
            .get(mode="clip", out_sharding=jax.typeof(image).sharding)
        )
        return {**batch, IMAGE_KEY: scaled}


def split_device_value_range(pp_fn: PreprocessFn) -> tuple[PreprocessFn, DeviceValueRange | None]:
    """(host op string, device scaling) for uint8 transfer, or (pp_fn, None) when the last op
    that writes "image" is not a value_range from 0..255 without clipping."""
    image_ops = [
        index
        for index, (name, args, kwargs) in enumerate(pp_fn.ops)
        if bound_arguments(name, args, kwargs).get("key") == IMAGE_KEY
    ]
    if not image_ops:
        return pp_fn, None
    last = image_ops[-1]
    name, args, kwargs = pp_fn.ops[last]
    if name != "value_range":
        return pp_fn, None
    arguments = bound_arguments(name, args, kwargs)
    if arguments["clip"] or (arguments["in_min"], arguments["in_max"]) != (0.0, 255.0):
        return pp_fn, None
    ops = [*pp_fn.ops[:last], *pp_fn.ops[last + 1 :], ("to_uint8", (), {})]
    fns = [*pp_fn.fns[:last], *pp_fn.fns[last + 1 :], PP_OPS.get("to_uint8")()]
    host = PreprocessFn(f"{pp_fn.pp} (host part: without op {last + 1}, then to_uint8)", ops, fns)
    return host, DeviceValueRange(float(arguments["vmin"]), float(arguments["vmax"]))
