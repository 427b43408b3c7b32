"""Monte-Carlo predictions of a heteroscedastic classifier, shared by the heads and the losses.

The prediction is E[softmax(u / tau)] (or E[sigmoid(u / tau)]) over the Gaussian logits u of a
distribution from models/heteroscedastic/logit_distributions.py, estimated with S samples.
Memory is flat in S: `log_mean_exp_over_samples` scans over chunks of samples and has a custom
gradient that recomputes each chunk in the backward pass, so nothing of size S is ever stored.
When all samples fit in one chunk, that chunk is differentiated directly (its memory is one chunk
either way, and the recomputation would be a fourth pass over the logit matmul).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.heteroscedastic.logit_distributions import Distribution, sample_logits

LIKELIHOODS = ("softmax", "sigmoid")


# --------------------------------------------------------------------------------------------
# log (1/S) sum_s exp(f_s), chunked over s, with a gradient that recomputes instead of storing.

SampleFn = Callable[[object, object, jax.Array, jax.Array], jax.Array]


def _chunk_layout(num_samples: int, chunk_size: int) -> tuple[int, int]:
    chunk = max(1, min(chunk_size, num_samples))
    return chunk, -(-num_samples // chunk)


def _chunk_sample_ids(chunk_index: jax.Array, chunk: int) -> jax.Array:
    return chunk_index * chunk + jnp.arange(chunk)


def _valid_samples(sample_ids: jax.Array, num_samples: int, ndim: int) -> jax.Array:
    """Mask of the real samples in a chunk (the last chunk may run past S), shaped to broadcast."""
    return (sample_ids < num_samples).reshape(sample_ids.shape + (1,) * (ndim - 1))


def _filled_like(struct: jax.ShapeDtypeStruct, value: float) -> jax.Array:
    """An array of `value` with struct's shape, dtype and, inside shard_map, device-variance.

    A scan's carry must have the type its body produces; under shard_map that includes the mesh
    axes the value varies over, which eval_shape reports and pcast applies.
    """
    filled = jnp.full(struct.shape, value, struct.dtype)
    axis_type = getattr(struct, "manual_axis_type", None)
    varying = tuple(sorted(axis_type.varying)) if axis_type is not None else ()
    return jax.lax.pcast(filled, varying, to="varying") if varying else filled


def _scan_chunks(chunk_fn, num_chunks: int, combine, fill: float):
    """combine(...combine(init, chunk_fn(0))..., chunk_fn(n - 1)) as one scan over all chunks.

    The carry starts as `fill` (the identity of `combine`) with chunk_fn's exact output type, so
    every chunk runs in the same loop body and one chunk's buffers are live at a time.
    """
    initial = jax.tree.map(lambda struct: _filled_like(struct, fill), jax.eval_shape(chunk_fn, 0))

    def body(carry, chunk_index):
        return combine(carry, chunk_fn(chunk_index)), None

    return jax.lax.scan(body, initial, jnp.arange(num_chunks))[0]


def _forward_scan(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size):
    chunk, num_chunks = _chunk_layout(num_samples, chunk_size)

    def chunk_log_sum(chunk_index):
        sample_ids = _chunk_sample_ids(chunk_index, chunk)
        values = sample_fn(diff_operands, aux_operands, key, sample_ids)
        valid = _valid_samples(sample_ids, num_samples, values.ndim)
        return jax.nn.logsumexp(jnp.where(valid, values, -jnp.inf), axis=0)

    return _scan_chunks(chunk_log_sum, num_chunks, jnp.logaddexp, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _log_mean_exp(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size):
    log_sum = _forward_scan(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size)
    return log_sum - math.log(num_samples)


def _log_mean_exp_fwd(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size):
    log_sum = _forward_scan(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size)
    return log_sum - math.log(num_samples), (diff_operands, aux_operands, key, log_sum)


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def _log_mean_exp_bwd(sample_fn, num_samples, chunk_size, residuals, output_cotangent):
    diff_operands, aux_operands, key, log_sum = residuals
    chunk, num_chunks = _chunk_layout(num_samples, chunk_size)

    def chunk_gradient(chunk_index):
        sample_ids = _chunk_sample_ids(chunk_index, chunk)
        values, pullback = jax.vjp(
            lambda operands: sample_fn(operands, aux_operands, key, sample_ids), diff_operands
        )
        valid = _valid_samples(sample_ids, num_samples, values.ndim)
        # d/d f_s of log sum_s exp(f_s) is the softmax weight exp(f_s - log_sum).
        weights = jnp.where(valid, jnp.exp(values - log_sum), 0.0) * output_cotangent
        return pullback(weights)[0]

    gradient = _scan_chunks(
        chunk_gradient, num_chunks, lambda total, part: jax.tree.map(jnp.add, total, part), 0.0
    )
    return (
        gradient,
        jax.tree.map(_zero_cotangent, aux_operands),
        jax.tree.map(_zero_cotangent, key),
    )


_log_mean_exp.defvjp(_log_mean_exp_fwd, _log_mean_exp_bwd)


def log_mean_exp_over_samples(
    sample_fn: SampleFn,
    diff_operands,
    aux_operands,
    key: jax.Array,
    num_samples: int,
    chunk_size: int,
) -> jax.Array:
    """log (1/S) sum_{s<S} exp(sample_fn(diff_operands, aux_operands, key, ids)[s]).

    sample_fn(diff_operands, aux_operands, key, sample_ids i32[C]) -> f32[C, ...] evaluates C
    samples at once and must be a pure function of its arguments (no captured arrays). Gradients
    flow to the floating-point leaves of diff_operands only; aux_operands (labels, masks) get none.
    Peak memory is that of one chunk: with several chunks the backward pass recomputes each chunk
    rather than storing the S per-sample values. S need not be a multiple of chunk_size.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples <= chunk_size:
        # One chunk: storing its values for the backward pass takes the memory that recomputing
        # them would, and saves a pass over sample_fn (e.g. a fourth logit matmul).
        values = sample_fn(
            diff_operands,
            jax.tree.map(jax.lax.stop_gradient, aux_operands),
            key,
            jnp.arange(num_samples),
        )
        return jax.nn.logsumexp(values, axis=0) - math.log(num_samples)
    return _log_mean_exp(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size)


# --------------------------------------------------------------------------------------------
# Predictive log-probabilities and log-likelihoods of either form of logit distribution.


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood {likelihood!r} is unknown; known: {LIKELIHOODS}")


def _per_sample_log_probs(operands, aux_operands, key, sample_ids, *, likelihood, share):
    """f32[C, B, K] log softmax(u_s / tau); sigmoid: f32[C, 2, B, K] log sigmoid(+-u_s / tau)."""
    del aux_operands
    distribution, tau = operands
    scaled = sample_logits(distribution, key, sample_ids, share) / tau
    if likelihood == "softmax":
        return jax.nn.log_softmax(scaled, axis=-1)
    return jnp.stack([jax.nn.log_sigmoid(scaled), jax.nn.log_sigmoid(-scaled)], axis=1)


def _per_sample_label_log_probs(operands, labels, key, sample_ids, *, share):
    """f32[C, B]: log softmax(u_s / tau)[y] of each example's label."""
    distribution, tau = operands
    log_probs = jax.nn.log_softmax(sample_logits(distribution, key, sample_ids, share) / tau, -1)
    return jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]


def deterministic_log_probs(
    distribution: Distribution, tau: jax.Array, likelihood: str = "softmax"
) -> jax.Array:
    """Noise-free log-probabilities f32[B, K] of the mean logits (the DET prediction)."""
    _check_likelihood(likelihood)
    scaled = distribution.mean / tau
    if likelihood == "softmax":
        return jax.nn.log_softmax(scaled, axis=-1)
    return jax.nn.log_sigmoid(scaled)


def deterministic_log_likelihood(
    distribution: Distribution,
    tau: jax.Array,
    labels: jax.Array,
    likelihood: str = "softmax",
) -> jax.Array:
    """Noise-free log-likelihood f32[B] of the labels (same label formats as mc_log_likelihood)."""
    _check_likelihood(likelihood)
    scaled = distribution.mean / tau
    if likelihood == "softmax":
        return jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), labels[:, None], -1)[:, 0]
    return jnp.sum(
        labels * jax.nn.log_sigmoid(scaled) + (1.0 - labels) * jax.nn.log_sigmoid(-scaled), -1
    )


def mc_log_probs(
    distribution: Distribution,
    tau: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    chunk_size: int,
    share_across_batch: bool = False,
    likelihood: str = "softmax",
) -> jax.Array:
    """log E[softmax(u / tau)] (or log E[sigmoid(u / tau)]), f32[B, K], from S samples.

    Probabilities, not logits, are averaged, in log space:
    logsumexp_s(log_softmax(u_s / tau)) - log S.
    """
    _check_likelihood(likelihood)
    sample_fn = functools.partial(
        _per_sample_log_probs, likelihood=likelihood, share=share_across_batch
    )
    log_probs = log_mean_exp_over_samples(
        sample_fn, (distribution, tau), None, key, num_samples, chunk_size
    )
    return log_probs if likelihood == "softmax" else log_probs[0]


def mc_log_likelihood(
    distribution: Distribution,
    tau: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    chunk_size: int,
    share_across_batch: bool = False,
    likelihood: str = "softmax",
) -> jax.Array:
    """MC log-likelihood of the labels, f32[B]; minus it is the training loss.

    Args:
      labels: softmax: class ids i32[B]; sigmoid: (multi-)hot targets f32[B, K] in [0, 1], scored
        as sum_k y_k log E[sigmoid] + (1 - y_k) log E[1 - sigmoid].
    Only the label's log-probability is carried per sample (softmax), so the memory of the
    backward pass is that of one chunk of samples whatever S is.
    """
    _check_likelihood(likelihood)
    if likelihood == "softmax":
        sample_fn = functools.partial(_per_sample_label_log_probs, share=share_across_batch)
        return log_mean_exp_over_samples(
            sample_fn, (distribution, tau), labels, key, num_samples, chunk_size
        )
    sample_fn = functools.partial(
        _per_sample_log_probs, likelihood="sigmoid", share=share_across_batch
    )
    log_positive, log_negative = log_mean_exp_over_samples(
        sample_fn, (distribution, tau), None, key, num_samples, chunk_size
    )
    return jnp.sum(labels * log_positive + (1.0 - labels) * log_negative, axis=-1)
