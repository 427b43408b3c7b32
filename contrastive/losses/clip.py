"""CLIP's symmetric softmax loss over the global batch.

Each device scores its b local images against all B texts (image -> text) and its b local texts
against all B images (text -> image); the matching pair of local example i is global example
offset + i. The loss is the mean of both directions' cross-entropies over the global batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from contrastive.losses.metrics import global_mean, logit_statistics
from contrastive.losses.sharding import AxisNames, gather_batch, require_positive, row_logsumexp


@dataclasses.dataclass(frozen=True)
class ClipLoss:
    """Softmax contrastive loss; reads outputs "image_embedding", "text_embedding", "tau".

    column_chunk_size: columns (texts or images) scored at once; sets peak memory.
    """

    column_chunk_size: int = 1024

    def __post_init__(self):
        require_positive(self, "column_chunk_size")

    def __call__(self, outputs: dict, rng: jax.Array, axis_names: AxisNames):
        del rng
        images, texts = outputs["image_embedding"], outputs["text_embedding"]
        scale = 1.0 / outputs["tau"]
        positive = scale * jnp.sum(images * texts, axis=-1)
        chunk = self.column_chunk_size
        image_to_text = positive - row_logsumexp(
            images, gather_batch(texts, axis_names), scale, chunk
        )
        text_to_image = positive - row_logsumexp(
            texts, gather_batch(images, axis_names), scale, chunk
        )
        loss_i2t = -global_mean(image_to_text, axis_names)
        loss_t2i = -global_mean(text_to_image, axis_names)
        metrics = {
            "loss_image_to_text": loss_i2t,
            "loss_text_to_image": loss_t2i,
            "tau": outputs["tau"],
            **logit_statistics(images, texts, scale, 0.0, axis_names),
        }
        return (loss_i2t + loss_t2i) / 2, metrics
