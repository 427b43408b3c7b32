"""Accuracy, negative log-likelihood and calibration (ECE) of an image classifier's predictions.

The prediction is the head's MC-averaged probabilities (eval_samples, a fixed noise key, so
repeated evaluations agree); DET heads are deterministic. ECE uses equal-width confidence bins:
sum over bins of |accuracy - mean confidence| weighted by the bin's share of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.batching import global_batches
from contrastive.mesh import replicated


def batch_statistics(log_probs, labels, mask, num_bins):
    """Per-batch sums: correct, nll, and per-bin counts / correct / confidence sums."""
    predictions = jnp.argmax(log_probs, axis=-1)
    confidence = jnp.exp(jnp.max(log_probs, axis=-1))
    correct = (predictions == labels) & mask
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    bins = jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)
    in_bin = jax.nn.one_hot(bins, num_bins) * mask[:, None]
    return {
        "correct": jnp.sum(correct),
        "nll": jnp.sum(jnp.where(mask, nll, 0.0)),
        "examples": jnp.sum(mask),
        "bin_count": jnp.sum(in_bin, axis=0),
        "bin_correct": jnp.sum(in_bin * correct[:, None], axis=0),
        "bin_confidence": jnp.sum(in_bin * confidence[:, None], axis=0),
    }


def expected_calibration_error(bin_count, bin_correct, bin_confidence) -> float:
    total = np.sum(bin_count)
    gaps = np.abs(bin_correct - bin_confidence)  # both are sums over the bin's examples
    return float(np.sum(gaps) / max(total, 1))


class ClassificationEvaluator:
    """Evaluates an ImageClassifier on a labelled split (see ZeroShotEvaluator for the args)."""

    def __init__(
        self,
        model: nn.Module,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        num_bins: int = 15,
    ):
        self.make_local_batches, self.local_batch_size, self.mesh = (
            make_local_batches,
            local_batch_size,
            mesh,
        )

        def statistics(params, batch):
            log_probs = model.apply(
                {"params": params}, batch["image"], rngs={"noise": jax.random.key(0)}
            )
            return batch_statistics(log_probs, batch["label"], batch["mask"], num_bins)

        self._statistics = jax.jit(statistics, out_shardings=replicated(mesh))

    def run(self, params) -> dict[str, float]:
        """{"accuracy", "nll", "ece", "eval_examples"} over the whole split."""
        totals = None
        for batch in global_batches(self.make_local_batches(), self.mesh, self.local_batch_size):
            stats = jax.device_get(self._statistics(params, batch))
            totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
        if totals is None or totals["examples"] == 0:
            raise ValueError("the evaluation split produced no examples")
        examples = float(totals["examples"])
        return {
            "accuracy": float(totals["correct"]) / examples,
            "nll": float(totals["nll"]) / examples,
            "ece": expected_calibration_error(
                totals["bin_count"], totals["bin_correct"], totals["bin_confidence"]
            ),
            "eval_examples": int(examples),
        }
