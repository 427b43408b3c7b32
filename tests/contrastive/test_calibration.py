"""Accuracy, NLL, Brier score and ECE against values worked out by hand."""

import math

import numpy as np
import pytest

from contrastive.evaluators.calibration import (
    PredictionTotals,
    confidence_bins,
    expected_calibration_error,
    per_example_statistics,
    prediction_metrics,
)

# Five predictions over three classes, none of them on a bin edge (multiples of 1/15).
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # label 0: right, confidence 0.70 (bin 10: 0.667-0.733)
        [0.50, 0.30, 0.20],  # label 1: wrong (second), confidence 0.50 (bin 7)
        [0.10, 0.15, 0.75],  # label 2: right, confidence 0.75 (bin 11)
        [0.20, 0.45, 0.35],  # label 2: wrong (second), confidence 0.45 (bin 6)
        [0.72, 0.18, 0.10],  # label 1: wrong (second), confidence 0.72 (bin 10, with the first)
    ]
)
LABELS = np.array([0, 1, 2, 2, 1])


def test_metrics_match_hand_computed_values():
    metrics = prediction_metrics(np.log(PROBS), LABELS, k_values=(1, 2))
    assert metrics["num_examples"] == 5
    assert metrics["top1"] == pytest.approx(2 / 5)
    assert metrics["top2"] == pytest.approx(1.0)  # every label is first or second
    nll = -(math.log(0.70) + math.log(0.30) + math.log(0.75) + math.log(0.35) + math.log(0.18))
    assert metrics["nll"] == pytest.approx(nll / 5, rel=1e-5)
    brier = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.5**2 + 0.7**2 + 0.2**2,
        0.1**2 + 0.15**2 + 0.25**2,
        0.2**2 + 0.45**2 + 0.65**2,
        0.72**2 + 0.82**2 + 0.1**2,
    ]
    assert metrics["brier"] == pytest.approx(sum(brier) / 5, rel=1e-5)
    # Bin 10 holds 0.70 (right) and 0.72 (wrong): |1 - 1.42|; the others one example each.
    ece = (abs(1 - (0.70 + 0.72)) + abs(0 - 0.50) + abs(1 - 0.75) + abs(0 - 0.45)) / 5
    assert metrics["ece"] == pytest.approx(ece, rel=1e-5)
    assert metrics["per_class_top1"] == pytest.approx([1.0, 0.0, 0.5])
    assert metrics["per_class_examples"] == [1, 2, 2]
    reliability = metrics["reliability"]
    assert reliability["count"][10] == 2 and sum(reliability["count"]) == 5
    assert reliability["accuracy"][10] == pytest.approx(0.5)
    assert reliability["confidence"][10] == pytest.approx(0.71)
    assert reliability["accuracy"][0] is None  # an empty bin


def test_random_predictions_match_a_numpy_reference_per_class_and_per_bin():
    rng = np.random.default_rng(2)
    n, classes, bins = 80, 7, 15
    logits = rng.normal(size=(n, classes)) * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, classes, n)
    metrics = prediction_metrics(np.log(probs), labels, k_values=(1, 5), num_bins=bins)

    order = np.argsort(-probs, axis=1)
    hit1 = order[:, 0] == labels
    hit5 = np.array([label in row[:5] for label, row in zip(labels, order, strict=True)])
    per_class_top1 = [hit1[labels == c].mean() for c in range(classes)]
    per_class_top5 = [hit5[labels == c].mean() for c in range(classes)]
    # A discriminating case: per-class top-1 and top-5 accuracies differ in every class.
    assert all(a < b for a, b in zip(per_class_top1, per_class_top5, strict=True))
    assert metrics["top1"] == pytest.approx(hit1.mean())
    assert metrics["top5"] == pytest.approx(hit5.mean())
    assert metrics["per_class_top1"] == pytest.approx(per_class_top1)
    assert metrics["per_class_examples"] == [int(np.sum(labels == c)) for c in range(classes)]

    confidence = probs.max(axis=1)
    counts, accuracies, confidences, ece = [], [], [], 0.0
    for b in range(bins):
        members = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        counts.append(int(members.sum()))
        accuracies.append(hit1[members].mean() if members.any() else None)
        confidences.append(confidence[members].mean() if members.any() else None)
        if members.any():
            ece += members.mean() * abs(hit1[members].mean() - confidence[members].mean())
    reliability = metrics["reliability"]
    assert reliability["count"] == counts
    for got, want in zip(reliability["accuracy"], accuracies, strict=True):
        assert got is None if want is None else got == pytest.approx(want)
    for got, want in zip(reliability["confidence"], confidences, strict=True):
        assert got is None if want is None else got == pytest.approx(want, rel=1e-6)
    assert metrics["ece"] == pytest.approx(ece, rel=1e-5)
    nll = -np.mean(np.log(probs[np.arange(n), labels]))
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)


def test_padding_rows_and_batches_do_not_change_the_result():
    whole = prediction_metrics(np.log(PROBS), LABELS)
    totals = PredictionTotals(num_classes=3)
    for rows in (slice(0, 2), slice(2, 5)):
        # Each batch padded with two rows of garbage that the mask excludes.
        log_probs = np.concatenate([np.log(PROBS[rows]), np.log(np.full((2, 3), 1 / 3))])
        labels = np.concatenate([LABELS[rows], [0, 0]])
        mask = np.arange(len(labels)) < len(LABELS[rows])
        totals.add(per_example_statistics(log_probs, labels), labels, mask)
    batched = totals.metrics()
    for key in ("top1", "nll", "ece", "brier", "num_examples", "per_class_top1"):
        assert batched[key] == pytest.approx(whole[key]), key
    assert "top5" not in batched  # k > number of classes is not reported


def test_a_tie_with_the_label_counts_in_its_favour():
    metrics = prediction_metrics(np.log([[0.4, 0.4, 0.2]]), np.array([1]))
    assert metrics["top1"] == 1.0


def test_bins_are_closed_on_the_right():
    edges = np.array([0.0, 1 / 30, 1 / 15 + 1e-9, 0.5, 1.0])
    np.testing.assert_array_equal(confidence_bins(edges, 15), [0, 0, 1, 7, 14])
    np.testing.assert_array_equal(confidence_bins(np.array([2 / 15]), 15), [1])


def test_ece_of_no_examples_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        expected_calibration_error(np.zeros(15), np.zeros(15), np.zeros(15))


def test_labels_outside_the_classes_are_an_error():
    totals = PredictionTotals(num_classes=3)
    stats = {"rank": [0], "confidence": [0.9], "nll": [0.1], "brier": [0.02]}
    with pytest.raises(ValueError, match="outside the 3 classes"):
        totals.add(stats, np.array([3]))
