"""Accuracy, NLL, Brier score and calibration (ECE) of an image classifier's predictions.

The prediction is the head's MC-averaged probabilities (eval_samples, a fixed noise key, so
repeated evaluations agree); DET heads are deterministic. The metrics and their definitions are
those of contrastive/evaluators/calibration.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.base import Evaluator
from contrastive.evaluators.batching import global_batches
from contrastive.evaluators.calibration import NUM_BINS, PredictionTotals, per_example_statistics
from contrastive.mesh import replicated


class ClassificationEvaluator(Evaluator):
    """Evaluates an ImageClassifier on a labelled split (see ZeroShotEvaluator for the args)."""

    def __init__(
        self,
        model: nn.Module,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        num_bins: int = NUM_BINS,
    ):
        self.model, self.num_bins = model, num_bins
        self.make_local_batches, self.local_batch_size, self.mesh = (
            make_local_batches,
            local_batch_size,
            mesh,
        )

        def statistics(params, batch):
            log_probs = model.apply(
                {"params": params}, batch["image"], rngs={"noise": jax.random.key(0)}
            )
            return {
                **per_example_statistics(log_probs, batch["label"]),
                "label": batch["label"],
                "mask": batch["mask"],
            }

        self._statistics = jax.jit(statistics, out_shardings=replicated(mesh))

    def evaluate(self, params) -> dict:
        """calibration.PredictionTotals.metrics() over the whole split."""
        totals = PredictionTotals(self.model.num_classes, (1, 5), self.num_bins)
        for batch in global_batches(self.make_local_batches(), self.mesh, self.local_batch_size):
            result = jax.device_get(self._statistics(params, batch))
            totals.add(result, result["label"], result["mask"])
        return totals.metrics()

    @staticmethod
    def log_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
        """evaluate()'s metrics for training logs: {"accuracy", "nll", "ece", "brier",
        "eval_examples"} over the whole split."""
        return {
            "accuracy": metrics["top1"],
            "nll": metrics["nll"],
            "ece": metrics["ece"],
            "brier": metrics["brier"],
            "eval_examples": metrics["num_examples"],
        }
