"""Retrieval Recall@K: a hand-worked case with a duplicate caption, and a plain numpy reference."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive.evaluators.retrieval import RetrievalEvaluator
from contrastive.mesh import make_mesh


class KnownEmbeddings(nn.Module):
    """Image embedding: the first pixel's three channels; token t embeds as text_table[t]."""

    text_table: Any

    def embed_images(self, images):
        return images[:, 0, 0, :], None

    def embed_texts(self, tokens):
        return jnp.asarray(self.text_table, jnp.float32)[tokens[:, 0]], None


def pairs(image_embeddings, tokens, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (len(image_embeddings), 4, 4, 3)).astype(np.float32)
    images[:, 0, 0, :] = image_embeddings
    return images, np.asarray(tokens, np.int32)[:, None]


def evaluator_for(model, images, texts, batch, **options):
    def local_batches():
        for start in range(0, len(images), batch):
            yield {"image": images[start : start + batch], "text": texts[start : start + batch]}

    return RetrievalEvaluator(model, local_batches, 8, make_mesh({"data": 8}), **options)


def test_hand_worked_recall_with_a_duplicate_caption():
    e1, e2, e3 = np.eye(3)
    diagonal = (e1 + e2) / np.sqrt(2)
    # Captions 0 and 1 are the same text (token 0, embedding e1); caption 3 is e2.
    model = KnownEmbeddings(text_table=[e1, e3, e2])
    images, texts = pairs([e1, e2, e3, diagonal], [0, 0, 1, 2])
    metrics = evaluator_for(model, images, texts, 3, k_values=(1, 2, 5)).evaluate({})
    # image -> text ranks: image 0 ties its own caption with the duplicate (rank 0); image 1
    # (e2) scores caption 3 above its own (rank 1); image 2 rank 0; the diagonal image ties
    # captions 0, 1 and its own caption 3 at 1/sqrt(2) (rank 0).
    assert metrics["image_to_text_r1"] == pytest.approx(3 / 4)
    assert metrics["image_to_text_r2"] == 1.0
    # text -> image ranks: caption 0 finds image 0 (0); caption 1, the duplicate, has images 0
    # and 3 above its own image 1 (2); caption 2 (0); caption 3 (e2) has image 1 above image 3 (1).
    assert metrics["text_to_image_r1"] == pytest.approx(2 / 4)
    assert metrics["text_to_image_r2"] == pytest.approx(3 / 4)
    assert metrics["text_to_image_r5"] == 1.0
    assert metrics["num_pairs"] == 4


def reference_recall(queries, candidates, k):
    hits = 0
    for i, query in enumerate(queries):
        scores = [float(np.dot(query, candidate)) for candidate in candidates]
        rank = sum(score > scores[i] for score in scores)
        hits += rank < k
    return hits / len(queries)


def test_recall_matches_a_numpy_reference_over_uneven_batches():
    rng = np.random.default_rng(3)
    n = 37
    table = rng.normal(size=(n, 3)).astype(np.float32)
    image_embeddings = table + 0.8 * rng.normal(size=(n, 3)).astype(np.float32)
    images, texts = pairs(image_embeddings, np.arange(n))
    metrics = evaluator_for(KnownEmbeddings(text_table=table), images, texts, 5).run({})
    assert metrics["retrieval_pairs"] == n
    for k in (1, 5, 10):
        expected_i2t = reference_recall(image_embeddings, table, k)
        expected_t2i = reference_recall(table, image_embeddings, k)
        assert 0 < expected_i2t < 1 or k == 10
        assert metrics[f"retrieval_image_to_text_r{k}"] == pytest.approx(expected_i2t)
        assert metrics[f"retrieval_text_to_image_r{k}"] == pytest.approx(expected_t2i)


def test_more_pairs_than_max_pairs_is_an_error():
    e1 = np.eye(3)[0]
    images, texts = pairs([e1] * 10, [0] * 10)
    evaluator = evaluator_for(KnownEmbeddings(text_table=[e1]), images, texts, 4, max_pairs=9)
    with pytest.raises(ValueError, match="max_pairs=9"):
        evaluator.evaluate({})


def test_exactly_max_pairs_is_allowed_and_an_empty_split_is_an_error():
    e1, e2 = np.eye(3)[:2]
    images, texts = pairs([e1, e2, e1, e2], [0, 1, 0, 1])
    model = KnownEmbeddings(text_table=[e1, e2])
    metrics = evaluator_for(model, images, texts, 3, max_pairs=4).evaluate({})
    assert metrics["num_pairs"] == 4
    # Pairs 0 and 2 (and 1 and 3) are identical: each ties with its twin, so every rank is 0.
    assert metrics["image_to_text_r1"] == 1.0 and metrics["text_to_image_r1"] == 1.0
    empty = evaluator_for(model, images[:0], texts[:0], 3)
    with pytest.raises(ValueError, match="no pairs"):
        empty.evaluate({})
