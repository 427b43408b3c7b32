"""Zero-shot classification: classes become texts, images are assigned to the nearest class.

For each class, every prompt template is filled with the class name, embedded by the text tower,
normalised, averaged over templates and normalised again (CLIP's prompt ensemble). An image's
prediction is the class whose embedding has the largest cosine with the deterministic (noise-free)
image embedding; top-1 and top-5 accuracy are counted over the whole split, padding excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.batching import global_batches, map_in_batches
from contrastive.mesh import replicated


def class_embeddings(
    embed_texts: Callable[[jax.Array], jax.Array],
    prompt_tokens: np.ndarray,
    num_classes: int,
    mesh: Mesh,
    batch_size: int,
) -> np.ndarray:
    """f32[C, D] unit class embeddings from tokens i32[C * T, L] of class-major prompts."""
    embeddings = map_in_batches(embed_texts, prompt_tokens, mesh, batch_size)
    per_class = embeddings.reshape(num_classes, -1, embeddings.shape[-1]).mean(axis=1)
    return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def _topk_correct(image_embeddings, labels, mask, classes, k_values):
    """Correct counts per k, and per class: top-1 correct and examples, f32[C] each."""
    scores = image_embeddings @ classes.T
    # rank of the true class = number of classes scoring strictly higher
    true_scores = jnp.take_along_axis(scores, labels[:, None], axis=1)
    rank = jnp.sum(scores > true_scores, axis=1)
    members = jax.nn.one_hot(labels, classes.shape[0]) * mask[:, None]
    per_class = {
        "correct": jnp.sum(members * (rank == 0)[:, None], axis=0),
        "examples": jnp.sum(members, axis=0),
    }
    return {k: jnp.sum(mask & (rank < k)) for k in k_values}, per_class


class ZeroShotEvaluator:
    """Top-k zero-shot accuracy of a two-tower model on a labelled image split.

    Args:
      model: the TwoTowers module (embed_images / embed_texts are used).
      prompt_tokens: i32[C * T, L], every template filled with every class name, class-major.
      num_classes: C.
      make_local_batches: returns a fresh iterator over this process's share of the split,
        numpy dicts with "image" f32[b, H, W, 3], "label" i32[b] and optionally "mask".
      local_batch_size: rows per process per evaluation batch (local batches are padded to it).
      mesh: the training mesh.
      k_values: which top-k accuracies to report.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_tokens: np.ndarray,
        num_classes: int,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        k_values: Sequence[int] = (1, 5),
    ):
        self.model, self.mesh = model, mesh
        self.prompt_tokens, self.num_classes = prompt_tokens, num_classes
        self.make_local_batches, self.local_batch_size = make_local_batches, local_batch_size
        self.k_values = tuple(k for k in k_values if k <= num_classes)
        self._embed_texts = jax.jit(
            lambda params, tokens: model.apply(
                {"params": params}, tokens, method=model.embed_texts
            )[0]
        )

        def count(params, batch, classes):
            embeddings, _ = model.apply(
                {"params": params}, batch["image"], method=model.embed_images
            )
            return _topk_correct(embeddings, batch["label"], batch["mask"], classes, self.k_values)

        self._count = jax.jit(count, out_shardings=replicated(mesh))

    def run(self, params, per_class: bool = False) -> dict[str, Any]:
        """{"zeroshot_top1": ..., "zeroshot_top5": ..., "zeroshot_examples": N}; with per_class,
        also "per_class_top1" and "per_class_examples" (lists in label order)."""
        text_batch = self.local_batch_size * jax.process_count()
        classes = class_embeddings(
            lambda tokens: self._embed_texts(params, tokens),
            self.prompt_tokens,
            self.num_classes,
            self.mesh,
            text_batch,
        )
        classes = jax.device_put(jnp.asarray(classes), replicated(self.mesh))
        totals = {k: 0 for k in self.k_values}
        class_correct = np.zeros(self.num_classes)
        class_examples = np.zeros(self.num_classes)
        for batch in global_batches(self.make_local_batches(), self.mesh, self.local_batch_size):
            correct, classes_seen = jax.device_get(self._count(params, batch, classes))
            for k in self.k_values:
                totals[k] += int(correct[k])
            class_correct += classes_seen["correct"]
            class_examples += classes_seen["examples"]
        examples = int(class_examples.sum())
        if examples == 0:
            raise ValueError("the zero-shot split produced no examples")
        metrics: dict[str, Any] = {f"zeroshot_top{k}": totals[k] / examples for k in self.k_values}
        metrics["zeroshot_examples"] = examples
        if per_class:
            metrics["per_class_top1"] = (class_correct / np.maximum(class_examples, 1)).tolist()
            metrics["per_class_examples"] = class_examples.astype(int).tolist()
        return metrics
