"""Per-pair scores of a trained two-tower model: which image-caption pairs look wrong.

For every pair i of a split, read once in order, against the other pairs of its batch of B:
  loss        -log softmax_j(x_i . t_j / tau)[i]: the pair's image->text loss with the
              deterministic embeddings (CLIP's own measure of a bad pair)
  and for a model with HET-XL image noise (S = the run's sampling.eval_samples draws):
  mc_loss     -log (1/S) sum_s softmax_j((x_i + eps_s) . t_j / tau)[i]
  mc_entropy  entropy of that averaged row, in nats
  noise_trace trace of Sigma(x_i) = V V^T + diag(d^2) (or + d d^T in shared-scalar mode) in the
              shared space: how much noise the model predicts for the image itself

A higher score means a more suspect pair. `roc_auc` reads a ranking against a ledger of which
pairs are known to be corrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.batching import global_batches
from contrastive.evaluators.zeroshot import (
    PRECISION,
    MonteCarlo,
    content_ids,
    mc_class_log_probs,
)
from contrastive.mesh import replicated

DETERMINISTIC_SCORES = ("loss",)
NOISE_SCORES = ("mc_loss", "mc_entropy", "noise_trace")


def noise_trace(noise: Any) -> jax.Array:
    """f32[B]: trace of each example's noise covariance V V^T + diag(d^2) (d d^T has the same
    trace)."""
    trace = jnp.sum(noise.diag_scale**2, axis=-1)
    if noise.factors is not None:
        trace += jnp.sum(noise.factors**2, axis=(-2, -1))
    return trace


def _scores(model: Any, monte_carlo: MonteCarlo | None, params: Any, batch: dict) -> dict:
    outputs = model.apply({"params": params}, batch["image"], batch["text"])
    images, texts, tau = outputs["image_embedding"], outputs["text_embedding"], outputs["tau"]
    # Padded rows take no part: -inf on their columns keeps them out of every softmax.
    column_bias = jnp.where(batch["mask"], 0.0, -jnp.inf)[None, :]
    if outputs.get("bias") is not None:
        column_bias = column_bias + outputs["bias"]
    logits = jnp.matmul(images, texts.T, precision=PRECISION) / tau + column_bias
    diagonal = jnp.arange(images.shape[0])
    result = {"loss": -jax.nn.log_softmax(logits, axis=-1)[diagonal, diagonal]}
    if monte_carlo is not None:
        noise = outputs["noise"]
        log_probs = mc_class_log_probs(
            images, noise, texts, tau, column_bias, content_ids(batch["image"]), monte_carlo
        )
        probs = jnp.exp(log_probs)
        result["mc_loss"] = -log_probs[diagonal, diagonal]
        result["mc_entropy"] = -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)
        result["noise_trace"] = noise_trace(noise)
    result["mask"] = batch["mask"]
    return result


class PairScorer:
    """Scores every pair of a split with a two-tower model (module doc).

    Args:
      model: the TwoTowers module.
      make_local_batches: returns a fresh iterator over this process's share of the split, in
        order: numpy dicts with "image" f32[b, H, W, 3], "text" i32[b, L], and any other keys
        (e.g. "label"), which are returned beside the scores.
      local_batch_size: rows per process per batch; every pair is scored against the others of
        its batch.
      mesh: the mesh the parameters live on.
      monte_carlo: how to draw the image noise, or None for a model without noise.
    """

    def __init__(
        self,
        model: Any,
        make_local_batches: Callable[[], Iterable[dict[str, np.ndarray]]],
        local_batch_size: int,
        mesh: Mesh,
        monte_carlo: MonteCarlo | None,
    ):
        self.make_local_batches = make_local_batches
        self.local_batch_size, self.mesh = local_batch_size, mesh
        self.score_names = DETERMINISTIC_SCORES + (NOISE_SCORES if monte_carlo else ())
        self._scores = jax.jit(
            lambda params, batch: _scores(model, monte_carlo, params, batch),
            out_shardings=replicated(mesh),
        )

    def score(self, params: Any) -> dict[str, np.ndarray]:
        """{score name: f32[N]} for the split's N pairs in order, plus the batches' other keys."""
        columns: dict[str, list[np.ndarray]] = {}
        for batch in global_batches(self.make_local_batches(), self.mesh, self.local_batch_size):
            extra = {k: v for k, v in batch.items() if k not in ("image", "text", "mask")}
            scores = self._scores(params, {k: batch[k] for k in ("image", "text", "mask")})
            scores, extra = jax.device_get((scores, extra))
            mask = scores.pop("mask")
            for name, values in {**scores, **extra}.items():
                columns.setdefault(name, []).append(np.asarray(values)[mask])
        if not columns:
            raise ValueError("the split produced no pairs to score")
        return {name: np.concatenate(parts) for name, parts in columns.items()}


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` ranking the True entries of `positives` first: the
    probability that a random positive scores above a random negative, ties counting half
    (the Mann-Whitney U statistic over n_pos * n_neg)."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    num_positive, num_negative = int(positives.sum()), int((~positives).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"ROC AUC needs both kinds of pairs: {num_positive} corrupted, {num_negative} clean"
        )
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks (1-based) over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    u = ranks[positives].sum() - num_positive * (num_positive + 1) / 2
    return float(u / (num_positive * num_negative))


def pair_scorer(
    values: dict, model: Any, mesh: Mesh, source: dict, batch_size: int, crop: bool
) -> PairScorer:
    """A PairScorer of a contrastive run (its validated config `values`, model and mesh) over
    `source` (a config.input source block), read once in order with the run's image size and
    caption encoding; the records' labels come along when the source has them."""
    # Imported here: build imports the zero-shot and retrieval evaluators this module sits beside.
    from contrastive.evaluators.build import (
        checked_eval_input,
        monte_carlo_options,
        training_text_encoding,
    )
    from contrastive.evaluators.inputs import caption_eval_pp, eval_input
    from data.config import validate_input_config
    from data.sources import make_source

    text = training_text_encoding(values)
    options = {k: v for k, v in source.items() if k != "name"}
    has_labels = getattr(make_source(source["name"], **options), "labels", None) is not None
    pp = caption_eval_pp(
        values["model"]["image_size"], text.length, text.tokenizer, text.add_eos, crop, has_labels
    )
    block = validate_input_config(eval_input(source, pp, batch_size), "pairs")
    needs = ("text", "label") if has_labels else ("text",)
    batches = checked_eval_input("pairs", block, values["model"]["image_size"], needs, text.length)
    noisy = values["model"].get("noise") is not None
    return PairScorer(
        model,
        batches,
        batch_size // jax.process_count(),
        mesh,
        monte_carlo_options(values) if noisy else None,
    )


def corruption_ledger(source: dict) -> dict[str, np.ndarray] | None:
    """{"clean_label", "label", "corrupted", "flip_probability"} [N] of a source that knows
    which of its labels (and so captions) it replaced (Fashion-MNIST with label noise), else
    None."""
    from data.sources import make_source

    options = {k: v for k, v in source.items() if k != "name"}
    built = make_source(source["name"], **options)
    clean = getattr(built, "clean_labels", None)
    if clean is None or not np.any(getattr(built, "flip_probabilities", 0)):
        return None
    return {
        "clean_label": np.asarray(clean),
        "label": np.asarray(built.labels),
        "corrupted": np.asarray(built.labels) != np.asarray(clean),
        "flip_probability": np.asarray(built.flip_probabilities),
    }
