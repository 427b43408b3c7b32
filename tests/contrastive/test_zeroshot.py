"""Zero-shot evaluator: a dense reference with a real model, hand-computed metrics with known
embeddings, and the Monte-Carlo HET-XL prediction against its analytic value."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.evaluators.batching import pad_batch
from contrastive.evaluators.zeroshot import MonteCarlo, ZeroShotEvaluator
from contrastive.mesh import make_mesh
from models.heteroscedastic import NoiseParameters, Sampling
from models.two_towers import TwoTowers

CLASSES, TEMPLATES, LENGTH, IMAGES = 7, 3, 5, 21


def batches_of(images, labels, size):
    def local_batches():
        for start in range(0, len(images), size):
            yield {"image": images[start : start + size], "label": labels[start : start + size]}

    return local_batches


def numpy_log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_zero_shot_metrics_match_dense_reference():
    model = TwoTowers(
        {"name": "vit", "variant": "mu/8", "pool_type": "gap"},
        {"name": "text_transformer", "variant": "mu", "vocab_size": 40, "max_len": LENGTH},
        embed_dim=8,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, (CLASSES * TEMPLATES, LENGTH)).astype(np.int32)
    images = rng.uniform(-1, 1, (IMAGES, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, IMAGES).astype(np.int32)
    params = model.init(jax.random.key(0), jnp.asarray(images[:1]), jnp.asarray(tokens[:1]))[
        "params"
    ]

    # Dense reference.
    texts = model.apply({"params": params}, jnp.asarray(tokens), method=model.embed_texts)[0]
    classes = np.asarray(texts).reshape(CLASSES, TEMPLATES, -1).mean(1)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    outputs = model.apply({"params": params}, jnp.asarray(images), None)
    scores = np.asarray(outputs["image_embedding"], np.float64) @ classes.T
    order = np.argsort(-scores, axis=1)
    hit1 = order[:, 0] == labels
    hit5 = np.array([label in row[:5] for label, row in zip(labels, order, strict=True)])
    top1, top5 = hit1.mean(), hit5.mean()
    assert 0 < top5 and top1 < 1  # a discriminating test case
    present = [c for c in range(CLASSES) if np.any(labels == c)]
    per_class_top1 = [hit1[labels == c].mean() if c in present else None for c in range(CLASSES)]
    per_class_top5 = [hit5[labels == c].mean() for c in present]
    # Per class too: counting top-5 hits as top-1 would change the table.
    assert [per_class_top1[c] for c in present] != per_class_top5
    log_probs = numpy_log_softmax(scores / float(outputs["tau"]))
    probs = np.exp(log_probs)
    nll = -np.mean(log_probs[np.arange(IMAGES), labels])
    brier = np.mean(np.sum((probs - np.eye(CLASSES)[labels]) ** 2, axis=1))

    # Uneven: batches of 8, 8 and 5 rows.
    evaluator = ZeroShotEvaluator(
        model, tokens, CLASSES, batches_of(images, labels, 8), 8, make_mesh({"data": 8})
    )
    metrics = evaluator.run(params)
    assert metrics["zeroshot_examples"] == IMAGES
    np.testing.assert_allclose(metrics["zeroshot_top1"], top1)
    np.testing.assert_allclose(metrics["zeroshot_top5"], top5)
    np.testing.assert_allclose(metrics["zeroshot_nll"], nll, rtol=1e-4)
    np.testing.assert_allclose(metrics["zeroshot_brier"], brier, rtol=1e-4)
    table = evaluator.evaluate(params)
    assert table["per_class_examples"] == [int(np.sum(labels == c)) for c in range(CLASSES)]
    assert len(table["per_class_top1"]) == CLASSES
    for got, want in zip(table["per_class_top1"], per_class_top1, strict=True):
        assert got is None if want is None else got == pytest.approx(want)


class KnownEmbeddings(nn.Module):
    """A stand-in two-tower model whose embeddings the test chooses.

    The image embedding is the first pixel's three channels (as given, not normalised); token
    t embeds as row t of text_table. HET-XL noise, when noise_scale is set, is isotropic:
    V = 0, d = noise_scale in every dimension.
    """

    text_table: Any
    tau: float = 1.0
    noise_scale: float | None = None

    @property
    def image_noise(self):
        return self.noise_scale

    def embed_texts(self, tokens):
        table = jnp.asarray(self.text_table, jnp.float32)
        rows = table[tokens[:, 0]]
        return rows / jnp.linalg.norm(rows, axis=-1, keepdims=True), None

    def __call__(self, images, tokens):
        embedding = images[:, 0, 0, :]
        noise = None
        if self.noise_scale is not None:
            batch, dim = embedding.shape
            noise = NoiseParameters(
                factors=jnp.zeros((batch, dim, 1)),
                diag_scale=jnp.full((batch, dim), self.noise_scale),
            )
        return {"image_embedding": embedding, "noise": noise, "tau": self.tau, "bias": None}


# Two templates per class whose mean points along an axis: the class embeddings are e1, e2, e3.
AXIS_TEMPLATES = [(1, 0.2, 0), (1, -0.2, 0), (0.1, 1, 0), (-0.1, 1, 0), (0, 0, 1), (0, 0, 2)]
PROMPT_TOKENS = np.arange(6, dtype=np.int32)[:, None]


def images_with_embeddings(embeddings, size=4, seed=0):
    """f32[N, size, size, 3] whose first pixel is the embedding; the rest random, so that every
    image is different."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (len(embeddings), size, size, 3)).astype(np.float32)
    images[:, 0, 0, :] = embeddings
    return images


def test_known_embeddings_give_hand_computed_metrics():
    # With class embeddings e1, e2, e3, logits = embedding / tau: embedding = tau * log(p)
    # makes the softmax exactly p.
    probs = np.array(
        [
            [0.70, 0.20, 0.10],
            [0.50, 0.30, 0.20],
            [0.10, 0.15, 0.75],
            [0.20, 0.45, 0.35],
            [0.72, 0.18, 0.10],
        ]
    )
    labels = np.array([0, 1, 2, 2, 1], np.int32)
    tau = 0.5
    images = images_with_embeddings(tau * np.log(probs))
    model = KnownEmbeddings(text_table=AXIS_TEMPLATES, tau=tau)
    evaluator = ZeroShotEvaluator(
        model, PROMPT_TOKENS, 3, batches_of(images, labels, 2), 8, make_mesh({"data": 8})
    )
    np.testing.assert_allclose(evaluator.class_embeddings({}), np.eye(3), atol=1e-6)
    metrics = evaluator.evaluate({})
    assert metrics["num_examples"] == 5
    assert metrics["top1"] == pytest.approx(0.4)
    assert "top5" not in metrics  # only 3 classes
    nll = -(math.log(0.70) + math.log(0.30) + math.log(0.75) + math.log(0.35) + math.log(0.18))
    assert metrics["nll"] == pytest.approx(nll / 5, rel=1e-5)
    brier = 0.14 + 0.78 + 0.095 + 0.665 + 1.2008  # sum_k (p_k - y_k)^2 of each row
    assert metrics["brier"] == pytest.approx(brier / 5, rel=1e-5)
    # Bins: 0.70 and 0.72 share (0.667, 0.733], one right and one wrong.
    ece = (abs(1 - 1.42) + 0.50 + abs(1 - 0.75) + 0.45) / 5
    assert metrics["ece"] == pytest.approx(ece, rel=1e-5)
    assert metrics["per_class_top1"] == pytest.approx([1.0, 0.0, 0.5])


def expected_sigmoid_of_gaussian(mean, std):
    """E[sigmoid(Z)], Z ~ N(mean, std^2), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    values = 1 / (1 + np.exp(-(mean + math.sqrt(2) * std * nodes)))
    return float(np.sum(weights * values) / math.sqrt(math.pi))


TWO_CLASS_TEMPLATES = [(1, 0.2, 0), (1, -0.2, 0), (-1, 0.2, 0), (-1, -0.2, 0)]


def test_monte_carlo_prediction_matches_its_analytic_value():
    # Classes e1 and -e1, embedding x = (0.25, 0, 0), isotropic noise d = 0.5, tau = 0.5:
    # (u0 - u1) / tau = 2 (x1 + eps1) / tau ~ N(1, 4), so p(class 0) = E[sigmoid(N(1, 4))]
    # = 0.647726 while the deterministic softmax gives sigmoid(1) = 0.731059 (HETXL.md section 6).
    n = 16
    images = images_with_embeddings(np.tile([0.25, 0.0, 0.0], (n, 1)))
    labels = np.zeros(n, np.int32)
    model = KnownEmbeddings(text_table=TWO_CLASS_TEMPLATES, tau=0.5, noise_scale=0.5)
    evaluator = ZeroShotEvaluator(
        model,
        PROMPT_TOKENS[:4],
        2,
        batches_of(images, labels, 8),
        8,
        make_mesh({"data": 8}),
        monte_carlo=MonteCarlo(Sampling(eval_samples=4096, chunk_size=512)),
    )
    metrics = evaluator.evaluate({})
    analytic = expected_sigmoid_of_gaussian(1.0, 2.0)
    assert analytic == pytest.approx(0.647726, abs=1e-6)
    assert metrics["nll"] == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-5)
    # 16 images x 4096 samples: the standard error of the mean probability is about 0.0012
    # (std of sigmoid(N(1, 4)) ~ 0.3); the deterministic value is 70 of them away.
    assert math.exp(-metrics["mc_nll"]) == pytest.approx(analytic, abs=0.005)
    assert metrics["mc_brier"] == pytest.approx(2 * (1 - analytic) ** 2, abs=0.01)
    assert metrics["mc_top1"] == 1.0 and metrics["mc_samples"] == 4096


def test_monte_carlo_metrics_do_not_depend_on_batching_or_order():
    rng = np.random.default_rng(1)
    n = 12
    images = images_with_embeddings(rng.normal(size=(n, 3)))
    labels = rng.integers(0, 3, n).astype(np.int32)
    model = KnownEmbeddings(text_table=AXIS_TEMPLATES, tau=0.3, noise_scale=0.4)
    results = []
    for batch, order in ((8, np.arange(n)), (3, rng.permutation(n))):
        evaluator = ZeroShotEvaluator(
            model,
            PROMPT_TOKENS,
            3,
            batches_of(images[order], labels[order], batch),
            8,
            make_mesh({"data": 8}),
            monte_carlo=MonteCarlo(Sampling(eval_samples=8, chunk_size=3)),
        )
        results.append(evaluator.evaluate({}))
    for key in ("mc_top1", "mc_nll", "mc_ece", "mc_brier", "nll"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-6), key


def test_monte_carlo_needs_a_model_with_noise():
    model = KnownEmbeddings(text_table=AXIS_TEMPLATES)
    with pytest.raises(ValueError, match="HET-XL image noise"):
        ZeroShotEvaluator(
            model,
            PROMPT_TOKENS,
            3,
            lambda: iter(()),
            8,
            make_mesh({"data": 8}),
            monte_carlo=MonteCarlo(Sampling(eval_samples=4)),
        )


def test_pad_batch_masks_padding_rows():
    padded = pad_batch({"label": np.array([3, 4])}, 4)
    np.testing.assert_array_equal(padded["label"], [3, 4, 0, 0])
    np.testing.assert_array_equal(padded["mask"], [True, True, False, False])
