"""Image-text retrieval: Recall@K in both directions on a split of (image, caption) pairs.

Pair i is image i with caption i. Image -> text ranks all N captions by cosine with image i
(deterministic embeddings) and asks whether caption i is among the first K; text -> image ranks
all N images for caption i. The positive is exactly the pair's own index: when the split holds
the same caption twice (Fashion-MNIST's captions are drawn from a bank of a few hundred per class),
only the pair's own copy counts as the hit. The rank of the positive is the number of candidates
scoring strictly higher, so a candidate scoring exactly as high as the positive (an identical
duplicate caption, whose embedding is bit for bit the same) does not push it down; this also
makes the result independent of the order of the pairs.

All N embeddings of both sides are held on every host (2 * N * D floats) and each direction costs
an N x N matrix product, computed in row blocks split over all devices; N is limited to
max_pairs (default 50,000: 200 MB of host memory at D = 512).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.base import Evaluator
from contrastive.evaluators.batching import global_batches, map_in_batches
from contrastive.evaluators.schema import MAX_PAIRS
from contrastive.evaluators.zeroshot import PRECISION
from contrastive.mesh import replicated

K_VALUES = (1, 5, 10)


def positive_ranks(
    queries: np.ndarray, candidates: np.ndarray, mesh: Mesh, batch_size: int
) -> np.ndarray:
    """int[N]: for each query i, the number of candidates scoring strictly above candidate i.

    queries, candidates: f32[N, D], row i of one the positive of row i of the other.
    """
    rank_rows = jax.jit(_rank_rows)
    candidates_on_devices = jax.device_put(np.asarray(candidates, np.float32), replicated(mesh))
    rows = {"query": queries, "index": np.arange(len(queries), dtype=np.int32)}
    return map_in_batches(
        lambda chunk: rank_rows(chunk, candidates_on_devices), rows, mesh, batch_size
    )


def _rank_rows(rows, candidates):
    scores = jnp.matmul(rows["query"], candidates.T, precision=PRECISION)  # [b, N]
    # The positive's score comes out of the same product as the others, so an identical
    # candidate ties with it exactly.
    positive = jnp.take_along_axis(scores, rows["index"][:, None], axis=1)
    return jnp.sum(scores > positive, axis=1)


def recall_at_k(ranks: np.ndarray, k_values: Sequence[int] = K_VALUES) -> dict[int, float]:
    """{k: fraction of ranks < k}."""
    ranks = np.asarray(ranks)
    return {k: float(np.mean(ranks < k)) for k in k_values}


class RetrievalEvaluator(Evaluator):
    """Recall@K, image -> text and text -> image, of a two-tower model on (image, caption) pairs.

    Args:
      model: the TwoTowers module (embed_images and embed_texts are used).
      make_local_batches: returns a fresh iterator over this process's share of the split,
        numpy dicts with "image" f32[b, H, W, 3], "text" i32[b, L] and optionally "mask".
      local_batch_size: rows per process per batch (local batches are padded to it).
      mesh: the mesh the parameters live on.
      k_values: the K of Recall@K.
      max_pairs: the most pairs held on the host; a larger split is an error.
    """

    def __init__(
        self,
        model: nn.Module,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        k_values: Sequence[int] = K_VALUES,
        max_pairs: int = MAX_PAIRS,
    ):
        self.make_local_batches, self.local_batch_size, self.mesh = (
            make_local_batches,
            local_batch_size,
            mesh,
        )
        self.k_values, self.max_pairs = tuple(k_values), max_pairs

        def embed(params, batch):
            variables = {"params": params}
            images = model.apply(variables, batch["image"], method=model.embed_images)[0]
            texts = model.apply(variables, batch["text"], method=model.embed_texts)[0]
            return images, texts, batch["mask"]

        self._embed = jax.jit(embed, out_shardings=replicated(mesh))

    def embeddings(self, params) -> tuple[np.ndarray, np.ndarray]:
        """The real pairs' image and text embeddings, f32[N, D] each, in matching order."""
        images, texts, count = [], [], 0
        for batch in global_batches(self.make_local_batches(), self.mesh, self.local_batch_size):
            image_rows, text_rows, mask = jax.device_get(self._embed(params, batch))
            count += int(mask.sum())
            if count > self.max_pairs:
                raise ValueError(
                    f"the retrieval split has more than max_pairs={self.max_pairs} pairs; "
                    "evaluate a part of it (fewer shards or a smaller split) or raise max_pairs"
                )
            images.append(image_rows[mask])
            texts.append(text_rows[mask])
        if count == 0:
            raise ValueError("the retrieval split produced no pairs")
        return np.concatenate(images), np.concatenate(texts)

    def evaluate(self, params) -> dict[str, float]:
        """{"image_to_text_r1", ..., "text_to_image_r10", "num_pairs"} (one key per K)."""
        images, texts = self.embeddings(params)
        batch_size = self.local_batch_size * jax.process_count()
        metrics: dict[str, float] = {}
        for direction, queries, candidates in (
            ("image_to_text", images, texts),
            ("text_to_image", texts, images),
        ):
            ranks = positive_ranks(queries, candidates, self.mesh, batch_size)
            for k, recall in recall_at_k(ranks, self.k_values).items():
                metrics[f"{direction}_r{k}"] = recall
        metrics["num_pairs"] = len(images)
        return metrics

    @staticmethod
    def log_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
        """evaluate()'s metrics prefixed "retrieval_" for training logs
        ("retrieval_image_to_text_r1", ..., "retrieval_pairs")."""
        scalars = {f"retrieval_{k}": v for k, v in metrics.items() if k != "num_pairs"}
        scalars["retrieval_pairs"] = metrics["num_pairs"]
        return scalars
