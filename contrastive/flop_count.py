"""Matmul FLOPs of a JAX function, counted from its jaxpr: the same number on every platform.

Model FLOPs utilisation needs the arithmetic the model asks for, not what a backend reports after
rewriting it. On an H200, XLA's cost analysis of the compiled configs/bench_b16.py step missed
the matmuls it hands to cuBLAS (1,660 of ~35,600 GFLOP), and for a plain bf16 matmul it gave a
negative count compiled and zero lowered. The jaxpr is the program before any backend sees it,
so its count is the same on CPU, GPU and TPU.

Counted: dot_general (2 x output size x contracted size) and conv_general_dilated (2 x output size
x the kernel's size per output feature), the operations MFU conventionally counts; elementwise
work is left out (on CPU, XLA's count of the configs/bench_ti.py step is ~1.5% higher for it).
Scans count their body `length` times (XLA counts a loop's body once); a while loop, whose trip
count is a run-time value, counts its body once; cond counts its costliest branch; what
rematerialisation recomputes is counted, since the jaxpr holds it. Inside shard_map the shapes
are one device's, so the body counts once per device of its manual mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.extend import core as jax_core


def matmul_flops(fn: Callable, *args: Any) -> int:
    """Matmul and convolution FLOPs of one call fn(*args), summed over the whole computation
    (every device's share); args may be arrays or ShapeDtypeStructs."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args))


def jaxpr_matmul_flops(closed_jaxpr: jax_core.ClosedJaxpr) -> int:
    """matmul_flops of a function already traced (`jax.jit(fn).trace(*args).jaxpr`)."""
    return _jaxpr_flops(closed_jaxpr.jaxpr)


def _jaxpr_flops(jaxpr: jax_core.Jaxpr) -> int:
    return sum(_equation_flops(equation) for equation in jaxpr.eqns)


def _equation_flops(equation) -> int:
    name, params = equation.primitive.name, equation.params
    if name == "dot_general":
        (contracting, _), _ = params["dimension_numbers"]
        lhs = equation.invars[0].aval.shape
        contracted = math.prod(lhs[axis] for axis in contracting)
        return 2 * math.prod(equation.outvars[0].aval.shape) * contracted
    if name == "conv_general_dilated":
        kernel = equation.invars[1].aval.shape
        out_feature_axis = params["dimension_numbers"].rhs_spec[0]
        per_output = math.prod(kernel) // kernel[out_feature_axis]
        return 2 * math.prod(equation.outvars[0].aval.shape) * per_output
    inner = [_jaxpr_flops(jaxpr) for jaxpr in _sub_jaxprs(params.values())]
    if name == "cond":
        return max(inner, default=0)
    if name == "scan":
        return params["length"] * sum(inner)
    if name == "shard_map":
        return _manual_devices(params) * sum(inner)
    return sum(inner)


def _sub_jaxprs(values: Iterable[Any]):
    """The jaxprs among an equation's parameters (pjit's, scan's and remat's body, cond's
    branches, while's condition and body, custom derivatives' primal function)."""
    for value in values:
        if isinstance(value, jax_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jax_core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _sub_jaxprs(value)


def _manual_devices(params: dict) -> int:
    """How many devices run a shard_map body: the product of its manual mesh axes' sizes."""
    mesh = params["mesh"]
    axes = params.get("newly_manual_axes") or params.get("manual_axes") or mesh.axis_names
    return math.prod(mesh.shape[axis] for axis in axes)
