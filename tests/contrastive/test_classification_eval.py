"""Classification metrics against numpy references."""

import jax.numpy as jnp
import numpy as np

from contrastive.evaluators.classification import (
    batch_statistics,
    expected_calibration_error,
)


def reference_ece(probs, labels, bins):
    confidence, predictions = probs.max(1), probs.argmax(1)
    total = 0.0
    for low in np.arange(bins) / bins:
        members = (confidence >= low) & (confidence < low + 1 / bins)
        if low == (bins - 1) / bins:
            members |= confidence == 1.0
        if members.any():
            accuracy = np.mean(predictions[members] == labels[members])
            total += members.mean() * abs(accuracy - confidence[members].mean())
    return total


def test_accuracy_nll_and_ece_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 6, 50)
    mask = np.arange(50) < 43  # the last 7 rows are padding
    log_probs = jnp.log(jnp.asarray(probs))
    stats = batch_statistics(log_probs, jnp.asarray(labels), jnp.asarray(mask), 10)
    real = slice(0, 43)
    assert int(stats["examples"]) == 43
    assert int(stats["correct"]) == np.sum(probs[real].argmax(1) == labels[real])
    np.testing.assert_allclose(
        stats["nll"], -np.log(probs[real][np.arange(43), labels[real]]).sum(), rtol=1e-5
    )
    ece = expected_calibration_error(
        np.asarray(stats["bin_count"]),
        np.asarray(stats["bin_correct"]),
        np.asarray(stats["bin_confidence"]),
    )
    np.testing.assert_allclose(ece, reference_ece(probs[real], labels[real], 10), rtol=1e-5)
