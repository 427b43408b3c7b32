"""Zero-shot evaluator against a dense reference computed with the model directly."""

import jax
import jax.numpy as jnp
import numpy as np

from contrastive.evaluators.batching import pad_batch
from contrastive.evaluators.zeroshot import ZeroShotEvaluator
from contrastive.mesh import make_mesh
from models.two_towers import TwoTowers

CLASSES, TEMPLATES, LENGTH, IMAGES = 7, 3, 5, 21


def test_zero_shot_accuracy_matches_dense_reference():
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
    embedded = model.apply({"params": params}, jnp.asarray(images), method=model.embed_images)[0]
    order = np.argsort(-(np.asarray(embedded) @ classes.T), axis=1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([label in row[:5] for label, row in zip(labels, order, strict=True)])
    assert 0 < top5 and top1 < 1  # a discriminating test case

    def local_batches():  # uneven: batches of 8, 8 and 5 rows
        for start in range(0, IMAGES, 8):
            yield {"image": images[start : start + 8], "label": labels[start : start + 8]}

    evaluator = ZeroShotEvaluator(model, tokens, CLASSES, local_batches, 8, make_mesh({"data": 8}))
    metrics = evaluator.run(params)
    assert metrics["zeroshot_examples"] == IMAGES
    np.testing.assert_allclose(metrics["zeroshot_top1"], top1)
    np.testing.assert_allclose(metrics["zeroshot_top5"], top5)


def test_pad_batch_masks_padding_rows():
    padded = pad_batch({"label": np.array([3, 4])}, 4)
    np.testing.assert_array_equal(padded["label"], [3, 4, 0, 0])
    np.testing.assert_array_equal(padded["mask"], [True, True, False, False])
