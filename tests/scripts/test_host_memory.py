"""scripts.host_memory: a large block freed by a worker thread is reused without page faults.

Each case runs in a fresh interpreter (the tuning must precede other threads' allocations), where a
worker thread mallocs 64 MiB, writes every page, frees it, and does the same again; the child
prints the minor page faults of the second round. glibc's default maps such a block anew each time
(one fault per 4 KiB page written); with the tuning the second round reuses the first's pages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from scripts.host_memory import OPT_OUT_VARIABLE, keep_host_memory, uses_glibc
from tests import REPO

BLOCK_BYTES = 64 << 20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

CHILD = textwrap.dedent(
    f"""
    import ctypes, ctypes.util, resource, sys, threading
    if sys.argv[1] == "tuned":
        from scripts.host_memory import keep_host_memory
        assert keep_host_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def touch_and_free():
        block = libc.malloc({BLOCK_BYTES})
        ctypes.memset(block, 1, {BLOCK_BYTES})
        libc.free(block)

    faults = []
    def worker():
        touch_and_free()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        touch_and_free()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(faults[0])
    """
)


def second_round_faults(mode: str) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.pop(OPT_OUT_VARIABLE, None)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=REPO,
    )
    return int(result.stdout.strip())


@pytest.mark.skipif(not uses_glibc(), reason="glibc malloc tuning")
def test_freed_block_is_reused_without_page_faults():
    pages = BLOCK_BYTES // PAGE_BYTES
    assert second_round_faults("default") >= pages // 2  # mapped anew: a fault per page written
    assert second_round_faults("tuned") < pages // 100


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT_VARIABLE, "0")
    assert keep_host_memory() is False
