"""Label noise by class and by image (data/label_noise.py), and the source options that pick it."""

from __future__ import annotations

import numpy as np
import pytest

from data import label_noise
from data.fashion_mnist import LABEL_NAMES, FashionMnistSource
from tests.data.helpers import make_fashion_dir, write_idx


def planted_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 [N, 28, 28]: class c lights up the 4x4 block c of the top row of 7x7 blocks, over
    faint noise, so a model of the pooled pixels separates the classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, column = divmod(int(label), 7)
        images[i, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4] = 255
    return images


def old_class_noise_reference(labels, confusable, other, seed):
    """The class model as first written: flip when u < p(y), to choices[floor(v * |choices|)]
    of the allowed classes in increasing order."""
    u = label_noise.example_uniforms(seed, len(labels), 0)
    v = label_noise.example_uniforms(seed, len(labels), 1)
    result = labels.copy()
    for i, label in enumerate(labels):
        group = (
            label_noise.CONFUSABLE_CLASSES if label in label_noise.CONFUSABLE_CLASSES else range(10)
        )
        p = confusable if label in label_noise.CONFUSABLE_CLASSES else other
        if u[i] < p:
            choices = [c for c in group if c != label]
            result[i] = choices[int(v[i] * len(choices))]
    return result


def test_class_model_draws_exactly_the_labels_of_its_first_formulation():
    labels = (np.arange(5000) * 7 % 10).astype(np.int32)
    for seed in (0, 3):
        np.testing.assert_array_equal(
            label_noise.noisy_labels(labels, 0.4, 0.05, seed),
            old_class_noise_reference(labels, 0.4, 0.05, seed),
        )


def test_weak_model_is_deterministic_and_learns_planted_classes():
    labels = np.arange(600) % 10
    images = planted_images(labels)
    model = label_noise.fit_weak_model(images, labels)
    probabilities = label_noise.weak_model_probabilities(model, images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
    assert np.mean(probabilities.argmax(axis=1) == labels) > 0.99
    again = label_noise.weak_model_probabilities(label_noise.fit_weak_model(images, labels), images)
    np.testing.assert_array_equal(probabilities, again)
    # New images of the same classes are classified too: the model is of pixels, not of rows.
    fresh = planted_images(labels[:100], seed=1)
    assert (
        np.mean(label_noise.weak_model_probabilities(model, fresh).argmax(1) == labels[:100]) > 0.99
    )


def test_rate_scale_meets_the_mean_rate_of_the_capped_formula():
    confusion = np.random.default_rng(0).beta(0.5, 2.0, 10_000)
    for rate in (0.05, 0.2, 0.4):
        a = label_noise.rate_scale(confusion, rate)
        assert np.mean(np.minimum(1.0, a * confusion)) == pytest.approx(rate, abs=1e-9)
    assert label_noise.rate_scale(confusion, 0.0) == 0.0
    with pytest.raises(ValueError, match="exceeds"):
        label_noise.rate_scale(np.r_[np.zeros(9), 0.5], 0.2)  # only 10% can flip at all
    with pytest.raises(ValueError, match="label_noise_rate"):
        label_noise.rate_scale(confusion, 1.5)


def test_image_noise_flips_by_the_images_confusion_to_the_classes_it_resembles():
    n = 40_000
    labels = np.zeros(n, np.int64)
    # Two kinds of class-0 images: clear ones (confusion 0.05, all of it towards class 1) and
    # ambiguous ones (confusion 0.5, split 3:1 between classes 2 and 3).
    ambiguous = np.arange(n) % 2 == 1
    weak = np.zeros((n, 10))
    weak[~ambiguous, 0], weak[~ambiguous, 1] = 0.95, 0.05
    weak[ambiguous, 0], weak[ambiguous, 2], weak[ambiguous, 3] = 0.5, 0.375, 0.125
    flip, wrong = label_noise.image_noise(weak, labels, rate=0.11)
    # mean of a * c = 0.11 with c = 0.05 and 0.5 in equal shares: a = 0.4.
    np.testing.assert_allclose(flip[~ambiguous], 0.02)
    np.testing.assert_allclose(flip[ambiguous], 0.2)
    noisy = label_noise.draw_noisy_labels(labels, flip, wrong, seed=1)
    tolerance = lambda p, m: 5 * np.sqrt(p * (1 - p) / m)  # noqa: E731
    m = n // 2
    assert abs(np.mean(noisy[~ambiguous] != 0) - 0.02) < tolerance(0.02, m)
    assert abs(np.mean(noisy[ambiguous] != 0) - 0.2) < tolerance(0.2, m)
    assert set(np.unique(noisy[~ambiguous])) == {0, 1}
    assert set(np.unique(noisy[ambiguous])) == {0, 2, 3}
    share_2 = np.mean(noisy[ambiguous] == 2)
    assert abs(share_2 - 0.15) < tolerance(0.15, m)
    # The report sees the spread within the class.
    report = label_noise.noise_report(labels, noisy, flip, LABEL_NAMES[:1])
    row = report["classes"][LABEL_NAMES[0]]
    assert row["flip_probability_mean"] == pytest.approx(0.11)
    assert row["flip_probability_std"] == pytest.approx(0.09)
    assert row["flip_probability_p10"] == pytest.approx(0.02)
    assert row["flip_probability_p90"] == pytest.approx(0.2)


def test_image_noise_source_varies_within_classes_and_keeps_its_ledger(tmp_path):
    labels = (np.arange(400) % 10).astype(np.uint8)
    images = planted_images(labels)
    # Blur a third of the images towards their neighbour class: those are the ambiguous ones.
    blurred = np.arange(400) % 3 == 0
    neighbour = planted_images((labels + 1) % 10, seed=2)
    images[blurred] = (images[blurred] // 2 + neighbour[blurred] // 2).astype(np.uint8)
    make_fashion_dir(tmp_path, n_train=400, n_test=20)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, True)
    options = dict(label_noise_model="image", label_noise_rate=0.25, label_noise_seed=4)
    source = FashionMnistSource(data_dir=str(tmp_path), **options)
    assert source.flip_probabilities.mean() == pytest.approx(0.25)
    assert (
        source.flip_probabilities[blurred].mean() > 2 * source.flip_probabilities[~blurred].mean()
    )
    for label in range(10):
        assert source.flip_probabilities[labels == label].std() > 0.01
    np.testing.assert_array_equal(source.clean_labels, labels)
    flipped = source.labels != labels
    assert 0.15 < flipped.mean() < 0.35
    # Flipped images mostly take the class they were blurred towards.
    towards = source.labels[flipped & blurred] == (labels[flipped & blurred] + 1) % 10
    assert towards.mean() > 0.5
    assert "by image, rate 0.25" in source.describe()
    again = FashionMnistSource(data_dir=str(tmp_path), **options)
    np.testing.assert_array_equal(again.labels, source.labels)
    test = FashionMnistSource(data_dir=str(tmp_path), split="test")
    assert not np.any(test.flip_probabilities)
    np.testing.assert_array_equal(test.labels, test.clean_labels)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(label_noise_model="pixels"), "label_noise_model 'pixels' is unknown"),
        (dict(label_noise_rate=0.2), "belongs to label_noise_model='image'"),
        (dict(label_noise_model="image", label_noise_other=0.1), "belong to label_noise_model"),
        (dict(label_noise_model="image", label_noise_rate=2.0), "label_noise_rate is a prob"),
    ],
)
def test_noise_options_of_the_other_model_are_refused(tmp_path, options, message):
    make_fashion_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        FashionMnistSource(data_dir=str(tmp_path), **options)
