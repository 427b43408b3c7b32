"""ImageClassifier: class ids given to a sigmoid head are scored as one-hot targets."""

import jax
import jax.numpy as jnp
import numpy as np

from models.classifier import ImageClassifier
from models.heteroscedastic import NoiseConfig, TemperatureConfig


def test_sigmoid_head_scores_class_ids_as_one_hot_targets():
    model = ImageClassifier(
        image_tower=dict(
            name="vit",
            patch_size=(4, 4),
            pool_type="gap",
            width=16,
            depth=1,
            mlp_dim=32,
            num_heads=2,
        ),
        num_classes=3,
        head="det",
        likelihood="sigmoid",
        noise=NoiseConfig(num_factors=1),
        temperature=TemperatureConfig(mode="fixed", init=0.5),
    )
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    labels = jnp.array([2, 0, 1])
    params = model.init(jax.random.key(1), images, labels)
    from_ids = model.apply(params, images, labels)
    log_probs = np.asarray(model.apply(params, images))  # log sigmoid(u / tau), [B, K]
    logits = np.log(np.exp(log_probs) / (1 - np.exp(log_probs)))  # u / tau
    targets = np.eye(3)[np.asarray(labels)]
    # sum_k y_k log sigmoid(z_k) + (1 - y_k) log sigmoid(-z_k), written out in numpy
    expected = np.sum(targets * log_probs - (1 - targets) * np.logaddexp(0.0, logits), axis=-1)
    np.testing.assert_allclose(from_ids, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_ids, model.apply(params, images, jnp.asarray(targets)))
