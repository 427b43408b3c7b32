"""CLIP's symmetric softmax loss over the global batch.

Each device scores its b local images against all B texts once: the rows of that block give
image -> text, its columns (combined across devices in log space) text -> image; the matching
pair of local example i is global example offset + i. The loss is the mean of both directions'
cross-entropies over the global batch.
"""

from __future__ import annotations

import dataclasses

import jax

from contrastive.losses.metrics import global_mean, logit_statistics
from contrastive.losses.sharding import (
    AxisNames,
    gather_batch,
    pair_log_likelihoods,
    require_positive,
)


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
        image_to_text, text_to_image = pair_log_likelihoods(
            images,
            texts,
            gather_batch(texts, axis_names),
            scale,
            self.column_chunk_size,
            axis_names,
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
