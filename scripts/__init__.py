"""Entry points. Importing this package first tunes glibc malloc for XLA's CPU runtime (see
scripts/host_memory.py); it has to happen before jax or tensorflow start their threads, and every
`python -m scripts.X` imports this package before the module itself."""

from scripts.host_memory import keep_host_memory

HOST_MEMORY_KEPT = keep_host_memory()
