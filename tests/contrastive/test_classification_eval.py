"""The classification evaluator against numpy references, over padded, uneven batches."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from contrastive.evaluators.classification import ClassificationEvaluator
from contrastive.mesh import make_mesh
from models import heteroscedastic as het

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


class PixelsThroughHead(nn.Module):
    """A stand-in classifier: phi is row 0 of each image (its first `dim` pixels), fed to a
    heteroscedastic head named "classifier" (as in ImageClassifier)."""

    num_classes: int
    dim: int
    noise: het.NoiseConfig
    temperature: het.TemperatureConfig
    sampling: het.Sampling

    @nn.compact
    def __call__(self, images, labels=None, *, train=False, deterministic=False):
        head = het.HeteroscedasticHead(
            self.num_classes,
            "hetxl",
            noise=self.noise,
            temperature=self.temperature,
            sampling=self.sampling,
            name="classifier",
        )
        return head(images[:, 0, : self.dim, 0], labels, train=train, deterministic=deterministic)


def expected_sigmoid_of_gaussian(mean, std):
    """E[sigmoid(Z)], Z ~ N(mean, std^2), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    return float(
        np.sum(weights * special.expit(mean + math.sqrt(2) * std * nodes)) / math.sqrt(math.pi)
    )


def test_hetxl_head_is_scored_by_its_mc_prediction_with_eval_samples_and_tau():
    # HETXL.md's two-class case with tau = 0.5: D = K = 2, W = [[1, -1], [0, 0]], b = 0,
    # phi = (0.5, 0), V = 0, d = (1, 1). (u0 - u1) / tau = 2 (0.5 + eps_0) / 0.5 ~ N(2, 16), so
    # p(class 0) = E[sigmoid(N(2, 16))], while the noise-free prediction is sigmoid(2) = 0.881.
    tau, samples = 0.5, 50_000
    model = PixelsThroughHead(
        num_classes=2,
        dim=2,
        # One training sample: an evaluator that scored with train=True would be far off.
        noise=het.NoiseConfig(num_factors=1),
        sampling=het.Sampling(train_samples=1, eval_samples=samples, chunk_size=10_000),
        temperature=het.TemperatureConfig("fixed", init=tau),
    )
    n = 8
    images = np.zeros((n, 2, 4, 1), np.float32)
    images[:, 0, 0, 0] = 0.5
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 0], np.int32)
    params = model.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, images)
    params = jax.tree.map(jnp.zeros_like, params["params"])
    head = params["classifier"]
    head["kernel"] = jnp.array([[1.0, -1.0], [0.0, 0.0]])
    # d = softplus(bias) + 1e-3 = 1 with a zero kernel; v = 0 makes V = 0 and the mean shift 0.
    head["noise"]["diag_scale"]["bias"] = jnp.full((2,), math.log(math.expm1(1.0 - 1e-3)))

    def local_batches():  # batches of 3, 3 and 2 rows, padded to 8
        for start in range(0, n, 3):
            yield {"image": images[start : start + 3], "label": labels[start : start + 3]}

    metrics = ClassificationEvaluator(model, local_batches, 8, make_mesh()).run(params)

    p = expected_sigmoid_of_gaussian(2.0, 4.0)
    assert (
        0.5 < p < special.expit(2.0) - 0.1
    )  # every prediction is class 0, less confident than DET
    label_probs = np.where(labels == 0, p, 1 - p)
    assert metrics["eval_examples"] == n
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    # Each example's probability has a Monte-Carlo standard error of std(sigmoid) / sqrt(S)
    # ~ 0.4 / 224 = 0.0018; the tolerances below are about four standard errors of each mean.
    assert metrics["nll"] == pytest.approx(-np.mean(np.log(label_probs)), abs=0.008)
    assert metrics["brier"] == pytest.approx(np.mean(2 * (1 - label_probs) ** 2), abs=0.004)
    # One bin holds every example: accuracy 5/8 against mean confidence p.
    assert metrics["ece"] == pytest.approx(abs(5 / 8 - p), abs=0.003)
