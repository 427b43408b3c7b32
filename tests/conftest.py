"""Test-wide setup: simulate 8 CPU devices so mesh and sharding code runs without an accelerator.

XLA reads these flags when the backend starts, so they must be set before jax is first imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The allocator setting every entry point uses (scripts/__init__.py), made before jax or
# tensorflow start threads, so in-process tests run XLA's CPU steps the way scripts do.
from scripts.host_memory import keep_host_memory  # noqa: E402

keep_host_memory()
