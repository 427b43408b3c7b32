"""SigLIP's pairwise sigmoid loss with a learned bias.

Every (image i, text j) pair of the global batch is a binary problem, positive iff j is i's
caption: loss = -(1/B) sum_i sum_j log sigmoid(z_ij (<image_i, text_j> / tau + bias)), z = +-1.
Each device sums over its local images against all gathered texts, chunk by chunk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from contrastive.losses.metrics import logit_statistics
from contrastive.losses.sharding import (
    AxisNames,
    batch_offset,
    gather_batch,
    require_positive,
    scan_column_chunks,
)


@dataclasses.dataclass(frozen=True)
class SigLipLoss:
    """Sigmoid loss; reads "image_embedding", "text_embedding", "tau" and "bias"."""

    column_chunk_size: int = 1024

    def __post_init__(self):
        require_positive(self, "column_chunk_size")

    def __call__(self, outputs: dict, rng: jax.Array, axis_names: AxisNames):
        del rng
        images, texts = outputs["image_embedding"], outputs["text_embedding"]
        scale, bias = 1.0 / outputs["tau"], outputs["bias"]
        if bias is None:
            raise ValueError("the SigLIP loss needs a bias: set the model's siglip bias option")
        local_batch = images.shape[0]
        positives = batch_offset(axis_names, local_batch) + jnp.arange(local_batch)

        def chunk_fn(total, dots, valid, column_index):
            signs = jnp.where(positives[:, None] == column_index[None, :], 1.0, -1.0)
            terms = jax.nn.log_sigmoid(signs * (scale * dots + bias))
            return total + jnp.sum(jnp.where(valid, terms, 0.0)), None

        all_texts = gather_batch(texts, axis_names)
        log_lik, _ = scan_column_chunks(
            images, all_texts, self.column_chunk_size, chunk_fn, jnp.zeros_like(images[0, 0])
        )
        global_batch = jax.lax.psum(local_batch, axis_names)
        loss = -jax.lax.psum(log_lik, axis_names) / global_batch
        metrics = {
            "tau": outputs["tau"],
            "bias": bias,
            **logit_statistics(images, texts, scale, bias, axis_names),
        }
        return loss, metrics
