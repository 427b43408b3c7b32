"""What XLA's compiler reports about a compiled function: peak memory and FLOPs.

Memory and cost are read from the compiled executable (never estimated by hand), so the numbers
reflect rematerialisation, fusion and buffer reuse as they will happen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def compile_function(fn: Callable, *args: Any, **jit_kwargs: Any) -> Any:
    """jit(fn, **jit_kwargs).lower(*args).compile(); args may be arrays or ShapeDtypeStructs."""
    return jax.jit(fn, **jit_kwargs).lower(*args).compile()


def peak_bytes(compiled: Any) -> int:
    """Peak device memory of one call: the larger of XLA's own peak estimate and live arguments
    + outputs + temporaries, less buffers aliased (donated) between them.

    Both are needed: the CPU backend reports a "peak" of arguments and outputs only, leaving out
    the temporaries where activations live.
    """
    stats = compiled.memory_analysis()
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    summed = int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return max(reported, summed)


def flops(compiled: Any) -> float:
    """FLOPs of one call from XLA's cost analysis (summed over the returned entries)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(entry.get("flops", 0.0) for entry in analysis or []))
