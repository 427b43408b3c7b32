"""Test-wide setup: simulate 8 CPU devices so mesh and sharding code runs without an accelerator.

XLA reads these flags when the backend starts, so they must be set before jax is first imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _default_xla_flag(name: str, value: str) -> None:
    """Adds --name=value to XLA_FLAGS unless the environment already sets that flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --{name}={value}".strip()


_default_xla_flag("xla_force_host_platform_device_count", "8")
# The tests' programs are tiny, so compiling them costs far more than running them: LLVM's
# cheapest level compiles about a quarter faster. Matmuls run in XLA's precompiled kernels
# either way, and every numerical test compares with a reference at its own tolerance.
_default_xla_flag("xla_backend_optimization_level", "0")
# XLA's newer MLIR fusion emitters take over twice as long to compile a tiny model's train
# step as the older LLVM IR emitters (7.6 s against 3.2 s for the demo's towers cut to one
# block); the tests compile hundreds of programs and run each a few times.
_default_xla_flag("xla_cpu_use_fusion_emitters", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests compile the same programs (a tiny config's train step in several runs, the same
# step in a resumed run, subprocesses of the multi-process tests): one persistent compilation
# cache per test session serves them all. Compilation results do not depend on it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    """Run the end-to-end tests (marked slow) first.

    `make test` hands the tests to worker processes (pytest-xdist) in this order, the first block
    to one worker: started first, the long jobs run in turn beside the many short tests on the
    other workers instead of alone at the end. A module's tests stay together, so the tests of a
    fixture built once per session (tests/shared.py) mostly run on the worker that built it.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
