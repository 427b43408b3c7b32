"""Accuracy and calibration of categorical predictions: top-k, NLL, Brier score and ECE.

For N examples with predicted probabilities p_i over K classes and labels y_i:

    rank_i    number of classes whose probability is strictly higher than p_i[y_i] (ties count
              in the label's favour, so the result does not depend on the order of classes)
    top-k     (1/N) sum_i [rank_i < k]; an example is "correct" when rank_i = 0
    NLL       -(1/N) sum_i log p_i[y_i]
    Brier     (1/N) sum_i sum_k (p_i[k] - [k = y_i])^2, between 0 and 2
    ECE       sum_b (n_b / N) |accuracy_b - mean confidence_b| over equal-width bins of the
              confidence c_i = max_k p_i[k]; bin b of M holds c in (b/M, (b+1)/M] (a confidence
              of exactly 0 goes to the first bin). M = 15 by default (Guo et al., 2017).

`per_example_statistics` computes the per-example terms on device, inside the evaluators' jitted
functions; `PredictionTotals` adds them on the host in float64. Every metric is a sum of
per-example terms divided by N, so memory stays bounded by the number of bins and classes, and
the result does not depend on how the examples were batched or spread over processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 15


def per_example_statistics(log_probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example terms of the metrics, from log-probabilities f32[B, K] and labels i32[B].

    Returns {"rank": i32[B], "confidence": f32[B], "nll": f32[B], "brier": f32[B]}.
    """
    label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    probs = jnp.exp(log_probs)
    one_hot = jax.nn.one_hot(labels, log_probs.shape[-1], dtype=probs.dtype)
    return {
        # Compared in log space: exp can round two different log-probabilities to one value.
        "rank": jnp.sum(log_probs > label_log_prob[:, None], axis=-1).astype(jnp.int32),
        "confidence": jnp.max(probs, axis=-1),
        "nll": -label_log_prob,
        # The direct form: the expansion sum p^2 - 2 p_y + 1 cancels badly near one-hot.
        "brier": jnp.sum((probs - one_hot) ** 2, axis=-1),
    }


def confidence_bins(confidence: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin index int[N] of each confidence: bin b holds (b/M, (b+1)/M], 0 goes to bin 0."""
    scaled = np.ceil(np.asarray(confidence, np.float64) * num_bins).astype(np.int64) - 1
    return np.clip(scaled, 0, num_bins - 1)


def expected_calibration_error(
    bin_count: np.ndarray, bin_correct: np.ndarray, bin_confidence: np.ndarray
) -> float:
    """sum_b |correct_b - confidence_b| / N from per-bin sums (count, correct, confidence)."""
    total = float(np.sum(bin_count))
    if total == 0:
        raise ValueError("the expected calibration error of no examples is undefined")
    return float(np.sum(np.abs(np.asarray(bin_correct) - np.asarray(bin_confidence))) / total)


@dataclasses.dataclass
class PredictionTotals:
    """Sums over examples of the per-example terms, accumulated batch by batch on the host.

    Attributes:
      num_classes: K (for the per-class accuracy).
      k_values: the top-k accuracies to report (those with k <= K).
      num_bins: M, the ECE's confidence bins.
    """

    num_classes: int
    k_values: Sequence[int] = (1, 5)
    num_bins: int = NUM_BINS

    def __post_init__(self):
        self.k_values = tuple(k for k in self.k_values if k <= self.num_classes)
        self.examples = 0
        self.top_k_correct = np.zeros(len(self.k_values), np.int64)
        self.nll_sum = 0.0
        self.brier_sum = 0.0
        self.bin_count = np.zeros(self.num_bins, np.int64)
        self.bin_correct = np.zeros(self.num_bins, np.int64)
        self.bin_confidence = np.zeros(self.num_bins, np.float64)
        self.class_correct = np.zeros(self.num_classes, np.int64)
        self.class_examples = np.zeros(self.num_classes, np.int64)

    def add(
        self,
        statistics: Mapping[str, Any],
        labels: np.ndarray,
        mask: np.ndarray | None = None,
    ) -> None:
        """Adds one batch: per_example_statistics' arrays [B], labels int[B], mask bool[B]
        (False rows are padding and are ignored)."""
        labels = np.asarray(labels)
        keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
        labels = labels[keep]
        rank = np.asarray(statistics["rank"])[keep]
        confidence = np.asarray(statistics["confidence"], np.float64)[keep]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label {int(labels.max())} is outside the {self.num_classes} classes")
        correct = rank == 0
        bins = confidence_bins(confidence, self.num_bins)
        self.examples += int(keep.sum())
        self.top_k_correct += [int(np.sum(rank < k)) for k in self.k_values]
        self.nll_sum += float(np.sum(np.asarray(statistics["nll"], np.float64)[keep]))
        self.brier_sum += float(np.sum(np.asarray(statistics["brier"], np.float64)[keep]))
        self.bin_count += np.bincount(bins, minlength=self.num_bins)
        self.bin_correct += np.bincount(bins, weights=correct, minlength=self.num_bins).astype(
            np.int64
        )
        self.bin_confidence += np.bincount(bins, weights=confidence, minlength=self.num_bins)
        self.class_correct += np.bincount(
            labels, weights=correct, minlength=self.num_classes
        ).astype(np.int64)
        self.class_examples += np.bincount(labels, minlength=self.num_classes)

    def metrics(self) -> dict[str, Any]:
        """{"top1", "top5", ..., "nll", "ece", "brier", "num_examples", "per_class_top1",
        "per_class_examples", "reliability"}; reliability holds per-bin "count", "accuracy"
        and "confidence" (means; None for empty bins), for a reliability diagram."""
        if self.examples == 0:
            raise ValueError("the evaluation produced no examples")
        n = self.examples
        metrics: dict[str, Any] = {
            f"top{k}": int(c) / n for k, c in zip(self.k_values, self.top_k_correct, strict=True)
        }
        metrics.update(
            nll=self.nll_sum / n,
            ece=expected_calibration_error(self.bin_count, self.bin_correct, self.bin_confidence),
            brier=self.brier_sum / n,
            num_examples=n,
            per_class_top1=[
                float(c) / e if e else None
                for c, e in zip(self.class_correct, self.class_examples, strict=True)
            ],
            per_class_examples=self.class_examples.tolist(),
            reliability={
                "count": self.bin_count.tolist(),
                "accuracy": _bin_means(self.bin_correct, self.bin_count),
                "confidence": _bin_means(self.bin_confidence, self.bin_count),
            },
        )
        return metrics


def _bin_means(sums: np.ndarray, counts: np.ndarray) -> list[float | None]:
    return [float(s) / c if c else None for s, c in zip(sums, counts, strict=True)]


def prediction_metrics(
    log_probs: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    k_values: Sequence[int] = (1, 5),
    num_bins: int = NUM_BINS,
) -> dict[str, Any]:
    """PredictionTotals.metrics() of one batch of log-probabilities f32[N, K] (a convenience for
    predictions already in memory)."""
    log_probs = jnp.asarray(log_probs)
    totals = PredictionTotals(log_probs.shape[-1], k_values, num_bins)
    statistics = jax.device_get(per_example_statistics(log_probs, jnp.asarray(labels)))
    totals.add(statistics, np.asarray(labels), mask)
    return totals.metrics()
