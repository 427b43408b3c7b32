"""Monte-Carlo machinery shared by the classification heads and the contrastive loss.

A heteroscedastic classifier's logits are Gaussian, u ~ N(mean(x), Sigma_u(x)), and its prediction
is E[softmax(u / tau)] (or E[sigmoid(u / tau)]), estimated with S samples. Two ideas keep it cheap:

* "W once" (HETXL.md section 4): for pre-logit noise eps = V e_R + d * e_N, the logits are
  u_s = (W^T phi + b) + (W^T V) e_R,s + W^T (d * e_N,s). W^T V is formed once per example, so the
  low-rank part costs R*K per sample instead of D*K. `LogitDistribution` holds that factorised form.
* Memory flat in S: `log_mean_exp_over_samples` scans over chunks of samples and has a custom
  gradient that recomputes each chunk in the backward pass, so nothing of size S is ever stored.

Sample s of example i draws its normals from fold_in(fold_in(key, s), i): results do not depend on
the chunk size nor on the device count, and a reference can reproduce them with
`standard_normal_draws`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.heteroscedastic.noise import NoiseParameters

LIKELIHOODS = ("softmax", "sigmoid")


@struct.dataclass
class LogitDistribution:
    """Gaussian over logits u = mean + factors @ e_R + diagonal term, in factorised form.

    Attributes:
      mean: f32[B, K], noise-free logits (any mean shift of the noise included).
      factors: f32[B, K, R], the low-rank part mapped to logit space, or None (no low-rank noise).
      diag_scale: per-dimension scale d, f32[B, N]; in shared-scalar mode the logit-space
        direction of the broadcast scalar, f32[B, K]. None means no diagonal noise.
      diag_projection: f32[N, K] maps the per-dimension diagonal noise to logits (W for pre-logit
        noise); None when the diagonal noise already lives in logit space.
      shared_scalar_diag: e_N is one scalar per (example, sample).
    """

    mean: jax.Array
    factors: jax.Array | None = None
    diag_scale: jax.Array | None = None
    diag_projection: jax.Array | None = None
    shared_scalar_diag: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_factors(self) -> int:
        return 0 if self.factors is None else self.factors.shape[-1]

    @property
    def diag_dim(self) -> int:
        """Size of e_N per example and sample (1 in shared-scalar mode, 0 without diag noise)."""
        if self.diag_scale is None:
            return 0
        return 1 if self.shared_scalar_diag else self.diag_scale.shape[-1]


def prelogit_noise_logits(
    pre_logits: jax.Array,
    class_matrix: jax.Array,
    noise: NoiseParameters,
    class_bias: jax.Array | None = None,
) -> LogitDistribution:
    """HET-XL: noise in pre-logit space, u = (phi + eps)^T W + b, in the W-once form.

    Args:
      pre_logits: phi, f32[B, D].
      class_matrix: W, f32[D, K]; any class matrix, e.g. a batch of text embeddings transposed.
      noise: NoiseParameters in the D-dim pre-logit space.
      class_bias: b, f32[K], or None.
    """
    shifted = pre_logits if noise.mean_shift is None else pre_logits + noise.mean_shift
    mean = shifted @ class_matrix
    if class_bias is not None:
        mean = mean + class_bias
    factors = jnp.einsum("bdr,dk->bkr", noise.factors, class_matrix)
    if noise.shared_scalar_diag:
        # d * e (e a scalar) maps to e * (d^T W): fold the projection in once per example.
        return LogitDistribution(mean, factors, noise.diag_scale @ class_matrix, None, True)
    return LogitDistribution(mean, factors, noise.diag_scale, class_matrix, False)


def logit_noise_logits(logits: jax.Array, noise: NoiseParameters) -> LogitDistribution:
    """HET: noise directly in logit space (N = K), u = logits + eps."""
    mean = logits if noise.mean_shift is None else logits + noise.mean_shift
    return LogitDistribution(mean, noise.factors, noise.diag_scale, None, noise.shared_scalar_diag)


def standard_normal_draws(
    key: jax.Array,
    sample_ids: jax.Array,
    batch_size: int,
    num_factors: int,
    diag_dim: int,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The standard normals of the given samples: e_R f32[C, B', R] and e_N f32[C, B', diag_dim].

    B' is 1 when the draws are shared across the batch, else batch_size. The draws of (sample s,
    example i) come from fold_in(fold_in(key, s), i) alone, so they do not depend on which other
    samples are drawn (chunking) nor on how the batch is split over devices: a device holding
    global examples example_ids i32[batch_size] (default arange) draws exactly what a single
    device holding the whole batch draws for them.
    """
    rows = 1 if share_across_batch else batch_size
    if example_ids is None or share_across_batch:
        example_ids = jnp.arange(rows)

    def one_draw(sample_id, example_id):
        draw_key = jax.random.fold_in(jax.random.fold_in(key, sample_id), example_id)
        factor_key, diag_key = jax.random.split(draw_key)
        return (
            jax.random.normal(factor_key, (num_factors,), jnp.float32),
            jax.random.normal(diag_key, (diag_dim,), jnp.float32),
        )

    per_example = jax.vmap(one_draw, in_axes=(None, 0))
    return jax.vmap(per_example, in_axes=(0, None))(sample_ids, example_ids)


def sample_prelogit_noise(
    noise: NoiseParameters,
    key: jax.Array,
    sample_ids: jax.Array,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> jax.Array:
    """Pre-logit noise samples eps f32[C, B, N] = mean_shift + V e_R + d * e_N, drawn densely.

    The contrastive loss uses this form: there the class matrix (all texts of the global batch) is
    as large as the batch, so mapping V through it once (the W-once form) saves nothing over adding
    the noise to the embeddings, and noisy embeddings can be re-normalised.
    """
    batch_size, noise_dim, num_factors = noise.factors.shape
    diag_dim = 1 if noise.shared_scalar_diag else noise_dim
    factor_draws, diag_draws = standard_normal_draws(
        key, sample_ids, batch_size, num_factors, diag_dim, share_across_batch, example_ids
    )
    eps = jnp.einsum("bnr,cbr->cbn", noise.factors, factor_draws) + noise.diag_scale * diag_draws
    return eps if noise.mean_shift is None else eps + noise.mean_shift


def sample_logits(
    distribution: LogitDistribution,
    key: jax.Array,
    sample_ids: jax.Array,
    share_across_batch: bool = False,
    example_ids: jax.Array | None = None,
) -> jax.Array:
    """Logit samples f32[C, B, K] for the C given sample ids (example_ids: see the draws)."""
    batch_size = distribution.mean.shape[0]
    factor_draws, diag_draws = standard_normal_draws(
        key,
        sample_ids,
        batch_size,
        distribution.num_factors,
        distribution.diag_dim,
        share_across_batch,
        example_ids,
    )
    num_chunk = sample_ids.shape[0]
    factor_draws = jnp.broadcast_to(factor_draws, (num_chunk, batch_size, factor_draws.shape[-1]))
    diag_draws = jnp.broadcast_to(diag_draws, (num_chunk, batch_size, diag_draws.shape[-1]))
    logits = jnp.broadcast_to(distribution.mean, (num_chunk,) + distribution.mean.shape)
    if distribution.factors is not None:
        logits = logits + jnp.einsum("bkr,cbr->cbk", distribution.factors, factor_draws)
    if distribution.diag_scale is None:
        return logits
    if distribution.shared_scalar_diag:
        return logits + diag_draws * distribution.diag_scale
    diag_noise = diag_draws * distribution.diag_scale
    if distribution.diag_projection is not None:
        diag_noise = diag_noise @ distribution.diag_projection
    return logits + diag_noise


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
    Peak memory is that of one chunk: the backward pass recomputes each chunk rather than storing
    the S per-sample values. S need not be a multiple of chunk_size.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return _log_mean_exp(sample_fn, diff_operands, aux_operands, key, num_samples, chunk_size)


# --------------------------------------------------------------------------------------------
# Predictive log-probabilities and log-likelihoods of a LogitDistribution.


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
    distribution: LogitDistribution, tau: jax.Array, likelihood: str = "softmax"
) -> jax.Array:
    """Noise-free log-probabilities f32[B, K] of the mean logits (the DET prediction)."""
    _check_likelihood(likelihood)
    scaled = distribution.mean / tau
    if likelihood == "softmax":
        return jax.nn.log_softmax(scaled, axis=-1)
    return jax.nn.log_sigmoid(scaled)


def deterministic_log_likelihood(
    distribution: LogitDistribution,
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
    distribution: LogitDistribution,
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
    distribution: LogitDistribution,
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
