"""HET-XL contrastive loss: the batch's texts are the classes, noise sits on the image embeddings.

For each Monte-Carlo sample s, image i's embedding becomes x_i + eps_is with eps drawn from its
HET-XL noise (V(x_i), d(x_i)) in the shared embedding space (optionally re-normalised). Scored
against all B texts with temperature tau, that gives two per-sample log-likelihoods of the matching
pair (HETXL.md sections 1 and 5):
    image -> text: log softmax_j(<x_is, t_j> / tau)[i]   (a row of the B x B matrix)
    text -> image: log softmax_k(<x_ks, t_i> / tau)[i]   (a column: over all noisy images)
With text_noise (a model option) the text side is noisy too, and text -> image becomes the
row-wise softmax of each noisy text against all images. Each is averaged over samples as
probabilities, log (1/S) sum_s exp(.), and the loss is minus their mean.

Each device holds its local noisy images as rows against all gathered texts; the column
log-sum-exp of the text -> image direction is combined across devices in log space
(`logsumexp_across`) instead of gathering S sets of noisy image embeddings.

The sample reduction is the heteroscedastic module's `log_mean_exp_over_samples`: memory is that
of one chunk of samples (and one chunk of columns) whatever S is.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from contrastive.losses.metrics import global_mean, logit_statistics
from contrastive.losses.sharding import (
    AxisNames,
    batch_offset,
    gather_batch,
    pair_log_likelihoods,
    require_positive,
    row_logsumexp,
)
from models.heteroscedastic import Sampling, log_mean_exp_over_samples, sample_prelogit_noise


@dataclasses.dataclass(frozen=True)
class HetXLLoss:
    """Reads "image_embedding", "text_embedding", "tau" and "noise" (NoiseParameters of the images).

    Attributes:
      sampling: S = sampling.train_samples per step, in chunks of `samples_per_chunk`.
      column_chunk_size: texts scored at once.
      renormalize: project each noisy image embedding back onto the unit sphere.
    """

    sampling: Sampling = Sampling()
    column_chunk_size: int = 1024
    renormalize: bool = False

    def __post_init__(self):
        require_positive(self, "column_chunk_size")

    def __call__(self, outputs: dict, rng: jax.Array, axis_names: AxisNames):
        images, texts = outputs["image_embedding"], outputs["text_embedding"]
        noise, text_noise, tau = outputs["noise"], outputs.get("text_noise"), outputs["tau"]
        if noise is None:
            raise ValueError("the HET-XL loss needs the model's image noise parameters ('noise')")
        local_batch = images.shape[0]
        example_ids = batch_offset(axis_names, local_batch) + jnp.arange(local_batch)
        all_texts = gather_batch(texts, axis_names)
        all_images = None if text_noise is None else gather_batch(images, axis_names)
        sample_fn = functools.partial(self._per_sample_log_likelihoods, axis_names=axis_names)
        log_lik = log_mean_exp_over_samples(
            sample_fn,
            (images, texts, all_texts, noise, tau, text_noise, all_images),
            example_ids,
            rng,
            self.sampling.train_samples,
            self.samples_per_chunk(local_batch, all_texts.shape[0]),
        )
        loss_i2t = -global_mean(log_lik[0], axis_names)
        loss_t2i = -global_mean(log_lik[1], axis_names)
        scale = 1.0 / tau
        metrics = {
            "loss_image_to_text": loss_i2t,
            "loss_text_to_image": loss_t2i,
            "tau": tau,
            "noise_diag_scale": global_mean(noise.diag_scale.mean(axis=-1), axis_names),
            "noise_factor_norm": global_mean(
                jnp.sqrt(jnp.sum(noise.factors**2, axis=(-2, -1))), axis_names
            ),
            **logit_statistics(images, texts, scale, 0.0, axis_names),
        }
        return (loss_i2t + loss_t2i) / 2, metrics

    def samples_per_chunk(self, local_batch: int, global_batch: int) -> int:
        """Samples scored at once: each forms f32[local batch, column chunk] logits at a time."""
        columns = min(self.column_chunk_size, global_batch)
        return self.sampling.samples_per_chunk(self.sampling.train_samples, local_batch * columns)

    def _noisy(self, embeddings, noise, key, sample_ids, example_ids):
        """Noisy copies f32[C, b, D] of unit embeddings f32[b, D], one per sample id."""
        noisy = embeddings + sample_prelogit_noise(
            noise, key, sample_ids, self.sampling.share_across_batch, example_ids
        )
        if self.renormalize:
            noisy = noisy / jnp.linalg.norm(noisy, axis=-1, keepdims=True)
        return noisy

    def _per_sample_log_likelihoods(self, operands, example_ids, key, sample_ids, *, axis_names):
        """f32[C, 2, b]: per-sample image->text and text->image log-likelihoods of the pairs.

        Image draws use `key` itself; text draws (text_noise) use fold_in(key, 1) on top of the
        per-sample, per-example folds, so the two sides' noise is independent.
        """
        images, texts, all_texts, noise, tau, text_noise, all_images = operands
        scale = 1.0 / tau
        noisy_images = self._noisy(images, noise, key, sample_ids, example_ids)
        if text_noise is not None:
            # Both sides noisy: each direction is a row-wise softmax of its own noisy rows.
            positive = scale * jnp.sum(noisy_images * texts, axis=-1)  # [C, b]
            image_to_text = positive - row_logsumexp(
                noisy_images, all_texts, scale, self.column_chunk_size
            )
            text_key = jax.random.fold_in(key, 1)
            noisy_texts = self._noisy(texts, text_noise, text_key, sample_ids, example_ids)
            text_positive = scale * jnp.sum(noisy_texts * images, axis=-1)
            text_to_image = text_positive - row_logsumexp(
                noisy_texts, all_images, scale, self.column_chunk_size
            )
            return jnp.stack([image_to_text, text_to_image], axis=1)

        image_to_text, text_to_image = pair_log_likelihoods(
            noisy_images, texts, all_texts, scale, self.column_chunk_size, axis_names
        )
        return jnp.stack([image_to_text, text_to_image], axis=1)
