"""Diagnostics shared by the contrastive losses: exact over the global batch, O(B D) to compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive.losses.sharding import AxisNames


def logit_statistics(
    images: jax.Array,
    texts: jax.Array,
    scale: jax.Array,
    bias: jax.Array | float,
    axis_names: AxisNames,
) -> dict[str, jax.Array]:
    """Mean logit of matching and of non-matching pairs over the global B x B matrix.

    The sum over all pairs is scale * <sum_i image_i, sum_j text_j> + B^2 bias, so no B x B matrix
    is formed. images, texts: this device's f32[b, D].
    """
    batch = jax.lax.psum(images.shape[0], axis_names)
    positive_sum = jax.lax.psum(jnp.sum(images * texts), axis_names)
    total_sum = jnp.dot(
        jax.lax.psum(images.sum(axis=0), axis_names), jax.lax.psum(texts.sum(axis=0), axis_names)
    )
    positive_mean = scale * positive_sum / batch + bias
    negative_mean = scale * (total_sum - positive_sum) / jnp.maximum(batch * (batch - 1), 1) + bias
    return {"positive_logit": positive_mean, "negative_logit": negative_mean}


def global_mean(x: jax.Array, axis_names: AxisNames) -> jax.Array:
    """Mean of a per-example f32[b] over the global batch (equal local batches)."""
    return jax.lax.pmean(jnp.mean(x), axis_names)
