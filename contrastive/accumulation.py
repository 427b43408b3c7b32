"""Gradient accumulation for contrastive losses that keeps every negative of the global batch.

A contrastive loss couples all B examples of a step (each one is a negative for all the others),
so averaging the losses of M microbatches would score each example against B/M - 1 negatives
instead of B - 1: a different, weaker objective. Here the gradient of the full-batch objective is
computed with the activation memory of one microbatch (the GradCache scheme, arXiv:2101.06983):

  1. forward every microbatch without keeping activations and reassemble the full-batch outputs
     (embeddings f32[B, D], HET-XL noise parameters, norms f32[B]; tau and bias are scalars);
  2. evaluate the sharded loss on them, with its gradient with respect to the outputs (O(B D));
  3. recompute each microbatch's forward under `jax.vjp` and pull back its slice of that output
     gradient; the parameter gradients of the microbatches add up to the full-batch gradient.

Peak memory is one microbatch's activations plus the full batch's outputs and their gradient; the
price is a second forward pass.

Microbatches are strided, not contiguous: microbatch m holds rows {i M + m}. The batch is split
device-major over the mesh's batch axes, so when every device holds a multiple of M rows each
device keeps its own rows in every microbatch, and splitting and merging need no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from contrastive.freezing import stop_frozen_gradients
from contrastive.losses.sharding import batch_spec
from contrastive.mesh import BATCH_AXES
from contrastive.objectives import contrastive_objective

# (params, batch, rng) -> ((loss, metrics), grads): what jax.value_and_grad(objective,
# has_aux=True) returns, so a train step can use either.
ValueAndGrad = Callable[[Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]

MODEL_INPUTS = ("image", "text")


def check_microbatching(batch_size: int, accum_steps: int, num_devices: int) -> None:
    """Raise ValueError unless B splits into M microbatches that split evenly over the devices.

    Each device must hold the same number of rows of every microbatch, i.e. B must be a multiple
    of M * devices; otherwise a microbatch could only be formed by moving rows between devices.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if batch_size % (accum_steps * num_devices):
        raise ValueError(
            f"a batch of {batch_size} examples does not split into {accum_steps} microbatches "
            f"whose size is a multiple of the {num_devices} devices of the batch axes: the batch "
            f"size must be a multiple of accum_steps * devices = {accum_steps * num_devices}"
        )


def microbatch(tree: Any, index: jax.Array | int, accum_steps: int) -> Any:
    """Microbatch `index` of M = accum_steps: rows {i M + index} of every leaf [B, ...].

    Leaves f32[B, ...] -> f32[B / M, ...]. Viewing the leading axis as [B / M, M] keeps each
    device's contiguous block of rows on that device; index may be traced (a scan counter).
    """

    def take(leaf: jax.Array) -> jax.Array:
        grouped = leaf.reshape(leaf.shape[0] // accum_steps, accum_steps, *leaf.shape[1:])
        return jax.lax.dynamic_index_in_dim(grouped, index, axis=1, keepdims=False)

    return jax.tree.map(take, tree)


def merge_microbatches(stacked: Any) -> Any:
    """Inverse of `microbatch` over all indices: leaves [M, B / M, ...] -> [B, ...].

    Row i M + m of the result is stacked[m, i], the original position of that example.
    """
    return jax.tree.map(_merge_leaf, stacked)


def _merge_leaf(leaf: jax.Array) -> jax.Array:
    accum_steps, rows = leaf.shape[:2]
    return jnp.swapaxes(leaf, 0, 1).reshape(rows * accum_steps, *leaf.shape[2:])


def accumulated_contrastive_value_and_grad(
    model: nn.Module,
    loss: Callable[..., tuple[jax.Array, dict]],
    mesh: Mesh,
    accum_steps: int,
    frozen: Any = None,
) -> ValueAndGrad:
    """((loss, metrics), grads) of `contrastive_objective(model, loss, mesh)`, in M microbatches.

    The function returned maps (params, batch, rng) like jax.value_and_grad of the objective:
    batch holds "image" f32[B, H, W, 3] and "text" i32[B, L] (other keys are ignored), split
    over the mesh's batch axes; B must be a multiple of accum_steps * (devices on the batch
    axes). The loss sees the whole batch (all B - 1 negatives of each example); only the towers
    run in microbatches. It is the objective's own parts, composed: its rng split, its forward
    per microbatch (dropout from fold_in(dropout_rng, m)) and its scoring of the whole batch, so
    the metrics are the objective's.

    Every model output must be either a scalar shared by all examples (tau, bias) or have the
    batch as its leading axis.

    accum_steps: M >= 2 (without accumulation the train step differentiates the objective).
    frozen: optional tree like the params with True for frozen leaves (contrastive.freezing);
      their gradient is zero and no backward pass runs through them.
    """
    if accum_steps < 2:
        raise ValueError(f"accumulation needs accum_steps >= 2, got {accum_steps}")
    objective = contrastive_objective(model, loss, mesh)
    num_devices = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))

    def split_over_batch_axes(tree: Any) -> Any:
        # Pins the layout XLA would otherwise infer through reshapes and a scan: rows over the
        # batch axes, scalars replicated. Splitting the [B / M, M] view along M instead would
        # move rows between devices.
        specs = batch_spec(tree, BATCH_AXES)
        return jax.lax.with_sharding_constraint(
            tree, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
        )

    def forward(params, inputs: dict, dropout_rng: jax.Array, index: jax.Array) -> dict:
        """Outputs of microbatch `index`: embeddings f32[B / M, D], norms f32[B / M], scalars."""
        rows = split_over_batch_axes(microbatch(inputs, index, accum_steps))
        return objective.forward(
            params, rows["image"], rows["text"], jax.random.fold_in(dropout_rng, index)
        )

    def merge_outputs(stacked: dict) -> dict:
        """Per-microbatch outputs stacked on a leading [M] axis -> full-batch outputs.

        The original row order matters beyond tidiness: the HET-XL loss keys each example's
        noise draws by its global row, so only this order reproduces the full-batch samples.
        """
        # Scalars (tau, bias) come out of every microbatch identical: keep one.
        return jax.tree.map(lambda leaf: leaf[0] if leaf.ndim == 1 else _merge_leaf(leaf), stacked)

    def microbatch_cotangents(output_grads: dict, index) -> dict:
        """Microbatch `index`'s share of d loss / d outputs.

        A scalar output is produced again by every microbatch's forward and all M copies feed
        the loss, so each copy gets 1/M of its gradient; the pullbacks then sum to the full one.
        """
        return jax.tree.map(
            lambda grad: (
                grad / accum_steps if grad.ndim == 0 else microbatch(grad, index, accum_steps)
            ),
            output_grads,
        )

    def value_and_grad(params, batch: dict, rng: jax.Array):
        inputs = {key: batch[key] for key in MODEL_INPUTS}
        sizes = {key: value.shape[0] for key, value in inputs.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"image and text batches differ in size: {sizes}")
        batch_size = sizes["image"]
        check_microbatching(batch_size, accum_steps, num_devices)
        dropout_rng, loss_rng = objective.split_rng(rng)
        indices = jnp.arange(accum_steps)

        # Pass 1: outputs only. The parameters are constants here (the loss reaches them only
        # through pass 2), so no microbatch's activations outlive its forward.
        constant_params = jax.lax.stop_gradient(params)
        stacked = jax.lax.map(
            lambda index: forward(constant_params, inputs, dropout_rng, index), indices
        )
        for leaf in jax.tree.leaves(stacked):
            if leaf.ndim > 1 and leaf.shape[1] != batch_size // accum_steps:
                raise ValueError(
                    f"a model output of per-microbatch shape {leaf.shape[1:]} is neither a "
                    f"scalar nor batched (leading axis {batch_size // accum_steps})"
                )
        outputs = split_over_batch_axes(merge_outputs(stacked))

        (loss_value, metrics), output_grads = jax.value_and_grad(objective.score, has_aux=True)(
            outputs, loss_rng
        )

        # Pass 2: recompute each microbatch's forward under vjp and pull back its cotangents.
        def accumulate(grads, index):
            def microbatch_forward(p):
                return forward(stop_frozen_gradients(p, frozen), inputs, dropout_rng, index)

            _, pullback = jax.vjp(microbatch_forward, params)
            (microbatch_grads,) = pullback(microbatch_cotangents(output_grads, index))
            return jax.tree.map(
                lambda total, g: total + g.astype(total.dtype), grads, microbatch_grads
            ), None

        # Sums of M terms are kept in at least float32 even for low-precision parameters.
        zeros = jax.tree.map(
            lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params
        )
        grads, _ = jax.lax.scan(accumulate, zeros, indices)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return (loss_value, metrics), grads

    return value_and_grad
