"""Zero-shot classification: classes become texts, images are assigned to the nearest class.

For each class, every prompt template is filled with the class name, embedded by the text tower,
normalised, averaged over templates and normalised again (CLIP's prompt ensemble). The class
embeddings are computed once per evaluation, their batches split over all devices of all
processes. An image's logits are cos(image, class) / tau (+ the SigLIP bias, which a softmax over
classes ignores) from the deterministic (noise-free) image embedding; the softmax over classes is
scored for top-k accuracy, NLL, Brier score and ECE (contrastive/evaluators/calibration.py).

Optionally, for a HET-XL model, the same metrics are computed from the Monte-Carlo predictive
distribution: S noisy copies of each image embedding, drawn from the model's noise head exactly as
the training loss draws them (contrastive/losses/hetxl.py, re-normalised if the loss does), each
scored against the class embeddings, and the S softmaxes averaged as probabilities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.base import Evaluator
from contrastive.evaluators.batching import global_batches, map_in_batches
from contrastive.evaluators.calibration import NUM_BINS, PredictionTotals, per_example_statistics
from contrastive.mesh import replicated
from models.heteroscedastic import (
    NoiseParameters,
    Sampling,
    log_mean_exp_over_samples,
    sample_prelogit_noise,
)
from models.two_towers import l2_normalize

# Cosines decide rankings; TPUs multiply float32 in bfloat16 passes by default, which reorders
# close classes. The evaluators' small matmuls run at full precision.
PRECISION = jax.lax.Precision.HIGHEST
PROMPT_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class MonteCarlo:
    """How HET-XL predictions are averaged over the image noise.

    Attributes:
      sampling: the run's sampling block; S = sampling.eval_samples noisy embeddings per image,
        drawn in chunks of sampling.samples_per_chunk (memory, not results, depends on them).
      renormalize: as the training loss (HetXLLoss) does.
      seed: the noise key, fixed so that repeated evaluations agree.
    """

    sampling: Sampling = Sampling()
    renormalize: bool = False
    seed: int = 0


def class_embeddings(
    embed_texts: Callable[[jax.Array], jax.Array],
    prompt_tokens: np.ndarray,
    num_classes: int,
    mesh: Mesh,
    batch_size: int,
) -> np.ndarray:
    """f32[C, D] unit class embeddings from tokens i32[C * T, L] of class-major prompts."""
    embeddings = map_in_batches(embed_texts, prompt_tokens, mesh, batch_size)
    per_class = embeddings.reshape(num_classes, -1, embeddings.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def class_log_probs(
    image_embeddings: jax.Array, classes: jax.Array, tau: jax.Array, bias: jax.Array | None
) -> jax.Array:
    """log softmax over classes of cos / tau (+ bias): f32[B, C] from f32[B, D] and f32[C, D]."""
    logits = jnp.matmul(image_embeddings, classes.T, precision=PRECISION) / tau
    return jax.nn.log_softmax(logits if bias is None else logits + bias, axis=-1)


def content_ids(images: jax.Array) -> jax.Array:
    """u32[B], a hash of each image's pixels f32[B, ...].

    Used as the example id of the noise draws (models.heteroscedastic.standard_normal_draws), it
    makes an image's noise a function of the image alone, so Monte-Carlo metrics do not depend on
    the batch an image lands in, its row, or the number of devices and processes. Integer sums
    wrap modulo 2**32, which is exact in any reduction order.
    """
    bits = jax.lax.bitcast_convert_type(images, jnp.uint32).reshape(images.shape[0], -1)
    positions = jnp.arange(bits.shape[1], dtype=jnp.uint32)
    weights = positions * jnp.uint32(0x9E3779B1) | jnp.uint32(1)  # odd: every pixel counts
    return jnp.sum(bits * weights, axis=1, dtype=jnp.uint32)


def mc_class_log_probs(
    image_embeddings: jax.Array,
    noise: NoiseParameters,
    classes: jax.Array,
    tau: jax.Array,
    bias: jax.Array | None,
    example_ids: jax.Array,
    monte_carlo: MonteCarlo,
) -> jax.Array:
    """log (1/S) sum_s softmax((x + eps_s) . classes / tau): f32[B, C].

    The noisy embeddings are formed densely, as in the loss, rather than in the heads' "W once"
    form: re-normalising them is not linear, and S * D * C flops per image are small next to the
    image tower.
    """

    def per_sample(operands, ids, key, sample_ids):
        images, noise, classes, tau, bias = operands
        noisy = images + sample_prelogit_noise(
            noise, key, sample_ids, monte_carlo.sampling.share_across_batch, ids
        )
        if monte_carlo.renormalize:
            noisy = l2_normalize(noisy)
        logits = jnp.matmul(noisy, classes.T, precision=PRECISION) / tau
        return jax.nn.log_softmax(logits if bias is None else logits + bias, axis=-1)

    return log_mean_exp_over_samples(
        per_sample,
        (image_embeddings, noise, classes, tau, bias),
        example_ids,
        jax.random.key(monte_carlo.seed),
        monte_carlo.sampling.eval_samples,
        monte_carlo.sampling.samples_per_chunk(
            monte_carlo.sampling.eval_samples, image_embeddings.shape[0] * classes.shape[0]
        ),
    )


class ZeroShotEvaluator(Evaluator):
    """Zero-shot accuracy and calibration of a two-tower model on a labelled image split.

    Args:
      model: the TwoTowers module: embed_texts, and __call__(images, None) for the image
        embedding, its noise, tau and bias.
      prompt_tokens: i32[C * T, L], every template filled with every class name, class-major.
      num_classes: C.
      make_local_batches: returns a fresh iterator over this process's share of the split,
        numpy dicts with "image" f32[b, H, W, 3], "label" i32[b] and optionally "mask".
      local_batch_size: rows per process per evaluation batch (local batches are padded to it).
      mesh: the mesh the parameters live on.
      k_values: which top-k accuracies to report.
      monte_carlo: also score the MC-averaged HET-XL prediction (needs a model with image noise).
      num_bins: confidence bins of the ECE.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_tokens: np.ndarray,
        num_classes: int,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        k_values: Sequence[int] = (1, 5),
        *,
        monte_carlo: MonteCarlo | None = None,
        num_bins: int = NUM_BINS,
    ):
        if len(prompt_tokens) % num_classes:
            raise ValueError(
                f"{len(prompt_tokens)} prompts do not split into {num_classes} classes"
            )
        if monte_carlo is not None and getattr(model, "image_noise", None) is None:
            raise ValueError(
                "Monte-Carlo predictions need a model with HET-XL image noise (model.noise); "
                "this model is deterministic"
            )
        self.model, self.mesh = model, mesh
        self.prompt_tokens, self.num_classes = prompt_tokens, num_classes
        self.make_local_batches, self.local_batch_size = make_local_batches, local_batch_size
        self.k_values, self.monte_carlo, self.num_bins = tuple(k_values), monte_carlo, num_bins
        self._embed_texts = jax.jit(
            lambda params, tokens: model.apply(
                {"params": params}, tokens, method=model.embed_texts
            )[0]
        )

        def statistics(params, batch, classes):
            outputs = model.apply({"params": params}, batch["image"], None)
            images, tau, bias = outputs["image_embedding"], outputs["tau"], outputs["bias"]
            labels = batch["label"]
            result = {
                "deterministic": per_example_statistics(
                    class_log_probs(images, classes, tau, bias), labels
                ),
                "label": labels,
                "mask": batch["mask"],
            }
            if monte_carlo is not None:
                log_probs = mc_class_log_probs(
                    images,
                    outputs["noise"],
                    classes,
                    tau,
                    bias,
                    content_ids(batch["image"]),
                    monte_carlo,
                )
                result["mc"] = per_example_statistics(log_probs, labels)
            return result

        self._statistics = jax.jit(statistics, out_shardings=replicated(mesh))

    def class_embeddings(self, params) -> np.ndarray:
        """f32[C, D], the unit prompt-ensemble embedding of each class."""
        # Prompts are short: batches of at least PROMPT_BATCH keep the number of calls small
        # (80 ImageNet templates x 1000 classes = 79 calls) whatever the image batch, but no
        # larger than the prompts need.
        unit = math.lcm(self.mesh.size, jax.process_count())
        batch = max(self.local_batch_size * jax.process_count(), PROMPT_BATCH)
        batch = min(batch, len(self.prompt_tokens))
        return class_embeddings(
            lambda tokens: self._embed_texts(params, tokens),
            self.prompt_tokens,
            self.num_classes,
            self.mesh,
            -(-batch // unit) * unit,
        )

    def evaluate(self, params) -> dict[str, Any]:
        """Every metric over the whole split: PredictionTotals.metrics() of the deterministic
        prediction ("top1", "top5", "nll", "ece", "brier", "num_examples", "per_class_top1",
        "per_class_examples", "reliability"), and with Monte-Carlo the same names prefixed
        "mc_" (per-class lists excepted)."""
        classes = self.class_embeddings(params).astype(np.float32)
        classes = jax.device_put(classes, replicated(self.mesh))
        totals = {"deterministic": self._totals()}
        if self.monte_carlo is not None:
            totals["mc"] = self._totals()
        batches = global_batches(self.make_local_batches(), self.mesh, self.local_batch_size)
        for batch in batches:
            result = jax.device_get(self._statistics(params, batch, classes))
            for kind, kind_totals in totals.items():
                kind_totals.add(result[kind], result["label"], result["mask"])
        metrics = totals["deterministic"].metrics()
        if self.monte_carlo is not None:
            mc = totals["mc"].metrics()
            for key in ("per_class_top1", "per_class_examples", "num_examples"):
                del mc[key]
            metrics.update({f"mc_{key}": value for key, value in mc.items()})
            metrics["mc_samples"] = self.monte_carlo.sampling.eval_samples
        return metrics

    @staticmethod
    def log_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
        """evaluate()'s scalar metrics for training logs: "zeroshot_top1", "zeroshot_top5",
        "zeroshot_nll", "zeroshot_ece", "zeroshot_brier", "zeroshot_examples" (and
        "zeroshot_mc_*" with Monte-Carlo)."""
        scalars = {
            f"zeroshot_{key}": value
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and key not in ("num_examples", "mc_samples")
        }
        scalars["zeroshot_examples"] = metrics["num_examples"]
        return scalars

    def _totals(self) -> PredictionTotals:
        return PredictionTotals(self.num_classes, self.k_values, self.num_bins)
