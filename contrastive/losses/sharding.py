"""Running a per-device loss over a mesh, and the column-chunked reductions the losses share.

Every loss is written for ONE device's shard of the global batch inside `shard_map`: its local
rows (images or texts) are scored against ALL columns of the other modality, gathered over the
batch axes with `all_gather`. The gather's transpose is a reduce-scatter, so gradients flow back to
the device that owns each column (open_clip's "local loss + gather with grad").

Columns are processed in chunks under `jax.checkpoint`, so a device never holds its full
[local batch, global batch] logit matrix, forward or backward: loss memory grows linearly with the
per-device batch, not quadratically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

AxisNames = str | tuple[str, ...]


def batch_offset(axis_names: AxisNames, local_batch: int) -> jax.Array:
    """Global index of this device's first example (examples are laid out device-major)."""
    return jax.lax.axis_index(axis_names) * local_batch


def gather_batch(x: jax.Array, axis_names: AxisNames) -> jax.Array:
    """All devices' shards concatenated along axis 0, f32[global batch, ...], differentiable."""
    return jax.lax.all_gather(x, axis_names, axis=0, tiled=True)


def column_chunks(columns: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split f32[K, D] into f32[n, c, D] chunks (zero-padded), with validity f32[n, c] and the
    global column index i32[n, c] of each slot."""
    num_columns = columns.shape[0]
    chunk = max(1, min(chunk_size, num_columns))
    num_chunks = -(-num_columns // chunk)
    padding = num_chunks * chunk - num_columns
    padded = jnp.pad(columns, ((0, padding), (0, 0)))
    index = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)
    return padded.reshape(num_chunks, chunk, -1), index < num_columns, index


def scan_column_chunks(
    rows: jax.Array,
    columns: jax.Array,
    chunk_size: int,
    chunk_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[Any, Any]],
    initial: Any,
) -> tuple[Any, Any]:
    """Scan chunk_fn(carry, dots, valid, column_index) over chunks of columns, rematerialised.

    rows f32[..., b, D] (leading sample axes allowed) and columns f32[K, D]; dots f32[..., b, c]
    are <rows_i, columns_j> for one chunk, valid bool[c] marks real (not padding) columns and
    column_index i32[c] their global index. Returns (final carry, stacked per-chunk outputs).
    """
    chunks, valid, index = column_chunks(columns, chunk_size)

    @jax.checkpoint
    def body(carry, chunk):
        column_chunk, chunk_valid, chunk_index = chunk
        dots = jnp.einsum("...bd,cd->...bc", rows, column_chunk)
        return chunk_fn(carry, dots, chunk_valid, chunk_index)

    return jax.lax.scan(body, initial, (chunks, valid, index))


def row_logsumexp(
    rows: jax.Array, columns: jax.Array, scale: jax.Array, chunk_size: int
) -> jax.Array:
    """logsumexp_j (scale * <rows_i, columns_j>) over all K columns, f32[..., b]."""

    def chunk_fn(running, dots, valid, _):
        logits = jnp.where(valid, scale * dots, -jnp.inf)
        return jnp.logaddexp(running, jax.nn.logsumexp(logits, axis=-1)), None

    initial = jnp.full_like(rows[..., 0], -jnp.inf)  # full_like keeps the device-variance
    return scan_column_chunks(rows, columns, chunk_size, chunk_fn, initial)[0]


def pair_log_likelihoods(
    images: jax.Array,
    texts: jax.Array,
    all_texts: jax.Array,
    scale: jax.Array,
    chunk_size: int,
    axis_names: AxisNames,
) -> tuple[jax.Array, jax.Array]:
    """Softmax log-likelihoods of the matching pairs in both directions, f32[..., b] each.

    images f32[..., b, D] (leading sample axes allowed) are this device's rows, texts f32[b, D]
    their captions and all_texts f32[B, D] the gathered captions. image -> text is the row
    softmax over all B texts; text -> image the column softmax of caption i over all B images
    of the same leading index, its log-sum-exp combined across devices in log space. Both come
    from ONE pass over the [..., b, B] logit block per direction of differentiation: no device
    scores its texts against the gathered images a second time.
    """
    positive = scale * jnp.sum(images * texts, axis=-1)

    def chunk_fn(row_total, dots, valid, _):
        logits = jnp.where(valid, scale * dots, -jnp.inf)  # [..., b, c]
        row_total = jnp.logaddexp(row_total, jax.nn.logsumexp(logits, axis=-1))
        # This device's rows' share of each column's log-sum-exp.
        return row_total, jax.nn.logsumexp(logits, axis=-2)

    initial = jnp.full_like(positive, -jnp.inf)
    row_total, column_chunks = scan_column_chunks(images, all_texts, chunk_size, chunk_fn, initial)
    num_columns = all_texts.shape[0]
    # [n, ..., c] -> [..., n * c] -> drop padding -> [..., B]
    column_partial = jnp.moveaxis(column_chunks, 0, -2)
    column_partial = column_partial.reshape(column_partial.shape[:-2] + (-1,))
    column_total = logsumexp_across(
        column_partial[..., :num_columns], axis_names, column_partial.ndim - 1
    )
    return positive - row_total, positive - column_total


def logsumexp_across(
    partial_logsumexp: jax.Array, axis_names: AxisNames, scatter_dimension: int
) -> jax.Array:
    """Combine per-device partial log-sum-exps of all K columns into this device's columns' totals.

    partial_logsumexp f32[..., K] (each device's LSE over its own rows) -> f32[..., K / devices]:
    log sum_devices exp(partial), reduce-scattered in log space. The shift by the global max only
    guards against overflow; it cancels exactly, so it carries no gradient.
    """
    shift = jax.lax.pmax(jax.lax.stop_gradient(partial_logsumexp), axis_names)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    summed = jax.lax.psum_scatter(
        jnp.exp(partial_logsumexp - shift),
        axis_names,
        scatter_dimension=scatter_dimension,
        tiled=True,
    )
    local = summed.shape[scatter_dimension]
    index = jax.lax.axis_index(axis_names) * local
    local_shift = jax.lax.dynamic_slice_in_dim(shift, index, local, axis=scatter_dimension)
    return jnp.log(summed) + local_shift


def batch_spec(tree: Any, batch_axes: AxisNames) -> Any:
    """PartitionSpecs for a pytree of model outputs: arrays with a batch axis are split over
    batch_axes, scalars (tau, bias) are replicated."""
    return jax.tree.map(
        lambda leaf: PartitionSpec() if jnp.ndim(leaf) == 0 else PartitionSpec(batch_axes), tree
    )


def shard_loss(
    per_device_loss: Callable[..., tuple[jax.Array, dict]],
    mesh: Mesh,
    batch_axes: AxisNames | Sequence[str] = "data",
) -> Callable[[Any, jax.Array], tuple[jax.Array, dict]]:
    """Wrap per_device_loss(outputs, rng, axis_names) into loss(outputs, rng) on global arrays.

    The per-device function must return values that are already reduced over the batch axes
    (pmean/psum): they come back replicated.
    """
    axes = tuple(batch_axes) if not isinstance(batch_axes, str) else batch_axes

    def loss(outputs, rng):
        def body(local_outputs, key):
            return per_device_loss(local_outputs, key, axes)

        return jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(batch_spec(outputs, axes), PartitionSpec()),
            out_specs=PartitionSpec(),
        )(outputs, rng)

    return loss


def require_positive(options, *names: str) -> None:
    """Raises ValueError naming the first of `names` (integer options of a loss) below 1."""
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
