"""Checksums that tell a damaged checkpoint from an intact one.

A checkpoint records, when it is written, one 32-bit checksum per array of the train state: the
sum over elements of (element bits) x (a per-position odd multiplier), modulo 2^32. It is
computed on the devices in one jitted pass, needs no gather to a host, and does not depend on
how the array is sharded or on the order devices add their shares (integer addition modulo 2^32
is exact), so a state restored onto another mesh or process count checks against the same
numbers. A flipped bit changes the sum; so does swapping two elements.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(leaf, _UNSIGNED[leaf.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
    position = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    multiplier = position * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * multiplier, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_leaf_checksum(leaf) for leaf in leaves]


def array_checksums(tree: Any) -> dict[str, int]:
    """{jax.tree_util.keystr(path): checksum} of every array leaf of tree."""
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_checksums([leaf for _, leaf in paths_and_leaves]))
    return {
        jax.tree_util.keystr(path): int(value)
        for (path, _), value in zip(paths_and_leaves, sums, strict=True)
    }


def differing(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Paths of `actual` whose checksum is not the one recorded in `expected` (paths absent from
    `expected`, e.g. a checkpoint written before checksums existed, are not judged)."""
    return sorted(path for path, value in actual.items() if expected.get(path, value) != value)


@jax.jit
def _nonfinite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.any(~jnp.isfinite(leaf)) for leaf in leaves]


def nonfinite_arrays(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of tree that hold a NaN or an infinity."""
    paths_and_leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    flags = jax.device_get(_nonfinite_flags([leaf for _, leaf in paths_and_leaves]))
    return [
        jax.tree_util.keystr(p) for (p, _), bad in zip(paths_and_leaves, flags, strict=True) if bad
    ]


def bytes_checksum(data: bytes) -> int:
    """CRC-32 of a small host-side file (an input position)."""
    return zlib.crc32(data)
