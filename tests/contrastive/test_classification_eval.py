"""The classification evaluator against numpy references, over padded, uneven batches."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from contrastive.evaluators.classification import ClassificationEvaluator
from contrastive.mesh import make_mesh

NUM_CLASSES = 6


class LogitsInPixels(nn.Module):
    """A stand-in classifier: row 0 of each image holds its logits."""

    num_classes: int = NUM_CLASSES

    def __call__(self, images):
        return jax.nn.log_softmax(images[:, 0, : self.num_classes, 0], axis=-1)


def reference_ece(probs, labels, bins):
    """Equal-width bins (b/M, (b+1)/M], weighted |accuracy - mean confidence|."""
    confidence, predictions = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        members = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        if members.any():
            accuracy = np.mean(predictions[members] == labels[members])
            total += members.mean() * abs(accuracy - confidence[members].mean())
    return total


def test_accuracy_nll_brier_and_ece_match_numpy():
    rng = np.random.default_rng(0)
    n = 43
    logits = (rng.normal(size=(n, NUM_CLASSES)) * 2).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    images = np.zeros((n, 2, 8, 1), np.float32)
    images[:, 0, :NUM_CLASSES, 0] = logits

    def local_batches():  # 5 batches of 9 rows, padded to 16, the last with 7 rows
        for start in range(0, n, 9):
            yield {"image": images[start : start + 9], "label": labels[start : start + 9]}

    evaluator = ClassificationEvaluator(LogitsInPixels(), local_batches, 16, make_mesh())
    metrics = evaluator.run({})

    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert metrics["eval_examples"] == n
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert metrics["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(n), labels])), rel=1e-5)
    brier = np.mean(np.sum((probs - np.eye(NUM_CLASSES)[labels]) ** 2, axis=1))
    assert metrics["brier"] == pytest.approx(brier, rel=1e-5)
    assert metrics["ece"] == pytest.approx(reference_ece(probs, labels, 15), rel=1e-5)
