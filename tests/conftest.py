"""Test-wide setup: simulate 8 CPU devices so mesh and sharding code runs without an accelerator.

XLA reads these flags when the backend starts, so they must be set before jax is first imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # The tests' programs are tiny, so compiling them costs far more than running them: LLVM's
    # cheapest level compiles about a quarter faster. Matmuls run in XLA's precompiled kernels
    # either way, and every numerical test compares with a reference at its own tolerance.
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
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


# Module fixtures whose work is done once per session for all workers (tests/shared.py).
SHARED_BUILDS = ("runs", "files", "small_run")


def pytest_collection_modifyitems(config, items):
    """Run the end-to-end tests (marked slow) first, and the tests that reuse a shared build last.

    `make test` hands the tests to worker processes (pytest-xdist) in this order, the first block
    to one worker: started first, the long jobs run in turn beside the many short tests on the
    other workers instead of alone at the end. A fixture built once per session
    (tests/shared.py) is built by the first of its tests; its other tests go last, so that no
    worker sits waiting for another's build.
    """
    first_users = set()

    def rank(item):
        for name in SHARED_BUILDS:
            if name in item.fixturenames:
                build = (item.nodeid.split("::")[0], name)
                if build in first_users:
                    return 2
                first_users.add(build)
        return 0 if item.get_closest_marker("slow") else 1

    ranks = {item.nodeid: rank(item) for item in items}  # in collection order
    items.sort(key=lambda item: ranks[item.nodeid])
