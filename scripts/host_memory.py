"""Keep freed host memory in the process, so a CPU step does not page-fault its buffers anew.

XLA's CPU runtime allocates a step's whole scratch space (2.2 GB for configs/bench_ti.py) with
malloc on a worker thread and frees it when the step ends. glibc serves an allocation that large
with a fresh mmap outside the thread's arena and unmaps it on free, so every step the kernel
zero-fills each page again: ~540k minor page faults and ~0.8 s of system time per step there,
about a fifth of the step. With one arena, no mmap-backed chunks and no trimming, the block
returns to the heap on free and the next step reuses it without a single fault.

The price: the process keeps its peak heap until it exits (training processes do anyway), and all
threads share one malloc arena. Set HETXL_KEEP_HOST_MEMORY=0 to leave glibc's defaults alone.
Must run before other threads have allocated (glibc fixes the arena limit then), i.e. before
jax or tensorflow are imported: `scripts.terminal.run` calls it first thing when an entry point
runs as a program (tests that call an entry point's main keep glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

OPT_OUT_VARIABLE = "HETXL_KEEP_HOST_MEMORY"
_applied = False


def uses_glibc() -> bool:
    """Whether this process's malloc is glibc's, the only one these settings are for."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_host_memory() -> bool:
    """Tune glibc malloc as described above; True if applied, False where it does not apply
    (not glibc, or opted out through HETXL_KEEP_HOST_MEMORY=0)."""
    if os.environ.get(OPT_OUT_VARIABLE, "1") == "0" or not uses_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = (
        (_M_ARENA_MAX, 1),  # worker threads allocate from the main heap, which can hold any size
        (_M_MMAP_MAX, 0),  # never serve a chunk by its own mmap (unmapped again on free)
        (_M_TRIM_THRESHOLD, -1),  # -1 becomes SIZE_MAX: never give the heap's top back
    )
    global _applied
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied


def host_memory_kept() -> bool:
    """Whether keep_host_memory has applied its settings in this process."""
    return _applied
