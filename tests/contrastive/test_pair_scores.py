"""Per-pair scores (contrastive/evaluators/pair_scores.py) against plain references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.evaluators.pair_scores import _scores, noise_trace, roc_auc
from contrastive.evaluators.zeroshot import MonteCarlo
from models.heteroscedastic import NoiseParameters, Sampling


def brute_force_auc(scores, positives):
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[positives], scores[~positives])
    ]
    return float(np.mean(pairs))


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, 60).astype(float)  # many ties
        positives = rng.random(60) < 0.3
        assert roc_auc(scores, positives) == pytest.approx(brute_force_auc(scores, positives))
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([True, False, False])) == 1.0
    assert roc_auc(np.array([1.0, 2.0, 3.0]), np.array([True, False, False])) == 0.0
    with pytest.raises(ValueError, match="both kinds"):
        roc_auc(np.ones(4), np.zeros(4, bool))


@pytest.mark.parametrize("shared_scalar", [False, True])
def test_noise_trace_is_the_trace_of_the_dense_covariance(shared_scalar):
    rng = np.random.default_rng(1)
    noise = NoiseParameters(
        factors=jnp.asarray(rng.normal(size=(5, 6, 3)), jnp.float32),
        diag_scale=jnp.asarray(rng.uniform(0.1, 1, (5, 6)), jnp.float32),
        shared_scalar_diag=shared_scalar,
    )
    dense = np.trace(np.asarray(noise.covariance()), axis1=1, axis2=2)
    np.testing.assert_allclose(noise_trace(noise), dense, rtol=1e-6)


class FixedOutputs:
    """Stands in for TwoTowers: apply returns the given outputs whatever the inputs."""

    def __init__(self, outputs):
        self.outputs = outputs

    def apply(self, variables, images, texts):
        return self.outputs


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_scores_match_a_plain_softmax_and_ignore_padded_rows():
    rng = np.random.default_rng(2)
    images, texts = unit(rng.normal(size=(6, 4))), unit(rng.normal(size=(6, 4)))
    tau = 0.2
    floor = NoiseParameters(
        factors=jnp.zeros((6, 4, 2)), diag_scale=jnp.full((6, 4), 1e-4), mean_shift=None
    )
    outputs = {
        "image_embedding": jnp.asarray(images, jnp.float32),
        "text_embedding": jnp.asarray(texts, jnp.float32),
        "tau": jnp.float32(tau),
        "bias": None,
        "noise": floor,
    }
    mask = np.array([True, True, True, True, False, False])
    batch = {"image": jnp.zeros((6, 2, 2, 3)), "text": jnp.zeros((6, 3), jnp.int32)}
    batch["mask"] = jnp.asarray(mask)
    monte_carlo = MonteCarlo(Sampling(train_samples=4, eval_samples=8, chunk_size=4))
    result = jax.device_get(_scores(FixedOutputs(outputs), monte_carlo, None, batch))
    # The reference: a softmax over the 4 real texts only.
    logits = images[:4] @ texts[:4].T / tau
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -np.diag(log_probs)
    np.testing.assert_allclose(result["loss"][:4], expected_loss, rtol=1e-5)
    # Noise at the floor: the Monte-Carlo scores are the deterministic ones.
    np.testing.assert_allclose(result["mc_loss"][:4], expected_loss, rtol=1e-3)
    entropy = -np.sum(np.exp(log_probs) * log_probs, axis=1)
    np.testing.assert_allclose(result["mc_entropy"][:4], entropy, rtol=1e-3)
    np.testing.assert_allclose(result["noise_trace"], 4 * 1e-8, rtol=1e-4)
    np.testing.assert_array_equal(result["mask"], mask)


def test_more_noise_on_an_image_raises_its_trace_and_entropy_only():
    rng = np.random.default_rng(3)
    images, texts = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(4, 8)))
    scale = np.full((4, 8), 1e-3, np.float32)
    scale[2] = 0.5  # image 2 is predicted to be noisy
    noise = NoiseParameters(factors=jnp.zeros((4, 8, 1)), diag_scale=jnp.asarray(scale))
    outputs = {
        "image_embedding": jnp.asarray(images, jnp.float32),
        "text_embedding": jnp.asarray(texts, jnp.float32),
        "tau": jnp.float32(0.1),
        "bias": None,
        "noise": noise,
    }
    batch = {"image": jnp.asarray(rng.normal(size=(4, 2, 2, 3)), jnp.float32)}
    batch.update(text=jnp.zeros((4, 3), jnp.int32), mask=jnp.ones(4, bool))
    monte_carlo = MonteCarlo(Sampling(eval_samples=64, chunk_size=16))
    result = jax.device_get(_scores(FixedOutputs(outputs), monte_carlo, None, batch))
    assert np.argmax(result["noise_trace"]) == 2
    quiet = [0, 1, 3]
    np.testing.assert_allclose(result["mc_loss"][quiet], result["loss"][quiet], rtol=1e-2)
    # Averaging softmaxes over large noise flattens the row: more entropy than without noise.
    logits = images @ texts.T / 0.1
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    entropy = -np.sum(np.exp(log_probs) * log_probs, axis=1)
    np.testing.assert_allclose(result["mc_entropy"][quiet], entropy[quiet], rtol=1e-2)
    assert result["mc_entropy"][2] > entropy[2] + 0.1
