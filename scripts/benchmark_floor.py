"""Work floors: the least work an S-sample HET-XL step can do, as programs the benchmarks time.

An S-sample HET-XL head must form S x B x K logits; no algebra makes S = 16 cost what S = 1 does.
The yardstick is the same logit volume done the plainest way:
  - head: DET's head on the S x B noisy pre-logit rows (phi + eps_s) at once, plus the HET-XL
    noise layers and draws that make eps (`HeadWorkFloor`): one forward and two backward logit
    matmuls, no chunking, no Monte-Carlo reduction, memory growing with S;
  - contrastive loss: CLIP's loss on each of the S noisy copies of the image embeddings, i.e.
    CLIP on an S-times larger logit block (each block formed once per pass, as ClipLoss does),
    plus the draws (`ClipWorkFloor`).
vs_floor = HET-XL's step time / the floor's, measured side by side.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive.losses.metrics import global_mean
from contrastive.losses.sharding import (
    AxisNames,
    batch_offset,
    gather_batch,
    pair_log_likelihoods,
)
from models.heteroscedastic import HeteroscedasticNoise, NoiseConfig, sample_prelogit_noise


class HeadWorkFloor(nn.Module):
    """DET's head on S x B noisy rows: f32[B, D] pre-logits -> per-row log-likelihoods f32[S*B].

    The noise layers are HET-XL's own (same parameters, same draws), so the floor pays for them
    too; the logits are those of the dense form, scored by plain cross-entropy.
    """

    num_classes: int
    num_samples: int
    noise: NoiseConfig = NoiseConfig()

    @nn.compact
    def __call__(
        self, pre_logits: jax.Array, labels: jax.Array, *, train: bool = True
    ) -> jax.Array:
        """The head's call form; `train` is accepted for it and changes nothing (S is fixed)."""
        del train
        dim = pre_logits.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (dim, self.num_classes))
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        noise = HeteroscedasticNoise(None, self.noise, name="noise")(pre_logits)
        eps = sample_prelogit_noise(noise, self.make_rng("noise"), jnp.arange(self.num_samples))
        rows = (pre_logits + eps).reshape(-1, dim)  # [S * B, D]
        log_probs = jax.nn.log_softmax(rows @ kernel + bias, axis=-1)
        tiled = jnp.tile(labels, self.num_samples)
        return jnp.take_along_axis(log_probs, tiled[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class ClipWorkFloor:
    """CLIP's loss averaged over S noisy copies of the images (inputs as for the HET-XL loss):
    each copy's [b, B] logit block is scored once, rows and columns, as ClipLoss scores it."""

    num_samples: int
    column_chunk_size: int = 1024

    def __call__(self, outputs: dict, rng: jax.Array, axis_names: AxisNames):
        images, texts, noise = (
            outputs["image_embedding"],
            outputs["text_embedding"],
            outputs["noise"],
        )
        local_batch = images.shape[0]
        example_ids = batch_offset(axis_names, local_batch) + jnp.arange(local_batch)
        eps = sample_prelogit_noise(
            noise, rng, jnp.arange(self.num_samples), example_ids=example_ids
        )
        image_to_text, text_to_image = pair_log_likelihoods(
            images + eps,
            texts,
            gather_batch(texts, axis_names),
            1.0 / outputs["tau"],
            self.column_chunk_size,
            axis_names,
        )
        loss = (
            -(
                global_mean(image_to_text.mean(0), axis_names)
                + global_mean(text_to_image.mean(0), axis_names)
            )
            / 2
        )
        return loss, {}
