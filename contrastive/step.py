"""The sharded train step: one jitted function over the mesh for every method.

An *objective* (contrastive/objectives.py) maps (params, batch, rng) to (loss, metrics) on global
arrays. `make_train_step` turns any objective and an optax optimizer into a jitted,
state-donating update with global-norm metrics and a guard that skips an update whose loss or
gradients are not finite (counted, never applied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from contrastive.freezing import stop_frozen_gradients
from contrastive.mesh import batch_sharding, replicated, state_shardings
from contrastive.objectives import Objective


@struct.dataclass
class TrainState:
    """What a checkpoint holds (with the input position, kept by the trainer).

    step: i32[], the number of updates applied or skipped so far.
    rng: the base key; step t uses fold_in(rng, t), so a resumed run draws what the original would.
    nonfinite_in_a_row: i32[], consecutive skipped (non-finite) updates.
    nonfinite_updates: i32[], all skipped updates of the run (the trainer logs the difference
      between log steps, so none goes uncounted between two of them).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_updates: jax.Array


def abstract_train_state(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    min_fsdp_size: int = 2**12,
) -> tuple[TrainState, Any]:
    """(state of ShapeDtypeStructs, shardings): what a restore needs, without allocating."""
    shapes = jax.eval_shape(lambda key: _fresh_state(init_params(key), optimizer, key), rng)
    shardings = state_shardings(shapes, mesh, min_fsdp_size)
    return _with_shardings(shapes, shardings), shardings


def abstract_params(
    init_params: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, min_fsdp_size: int = 2**12
) -> Any:
    """The parameters as ShapeDtypeStructs with the shardings training gives them."""
    shapes = jax.eval_shape(init_params, rng)
    return _with_shardings(shapes, state_shardings(shapes, mesh, min_fsdp_size))


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their sharding: what orbax restores straight into place."""
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def _fresh_state(params, optimizer, rng) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.fold_in(rng, 1),
        nonfinite_in_a_row=jnp.zeros((), jnp.int32),
        nonfinite_updates=jnp.zeros((), jnp.int32),
    )


def init_train_state(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    min_fsdp_size: int = 2**12,
    load_params: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, Any]:
    """Params and optimizer state initialised in their shardings; returns (state, shardings).

    Params come from init_params(rng); the state's base key is fold_in(rng, 1).
    load_params: optional host-side function replacing initial params by pretrained ones (LiT);
    it receives numpy arrays (fully replicated params) and its result is put back sharded.
    """
    _, shardings = abstract_train_state(init_params, optimizer, rng, mesh, min_fsdp_size)
    params = jax.jit(init_params, out_shardings=shardings.params)(rng)
    if load_params is not None:
        params = jax.device_put(load_params(jax.device_get(params)), shardings.params)
    state = jax.jit(lambda p: _fresh_state(p, optimizer, rng), out_shardings=shardings)(params)
    return state, shardings


def _masked_norm(tree: Any, mask: Any) -> jax.Array:
    """The global L2 norm of the leaves of `tree` whose `mask` leaf is True."""
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True)
    chosen = [leaf for leaf, keep in pairs if keep]
    return optax.tree.norm(chosen)


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_sharding: Any,
    frozen: Any = None,
    value_and_grad: Callable | None = None,
    prepare_batch: Callable[[dict], dict] | None = None,
    norm_groups: dict[str, Any] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(step)(state, batch) -> (state, metrics); the input state's buffers are donated.

    frozen: optional tree like the params with True for frozen leaves (see contrastive.freezing).
    Their gradient is stopped before the backward pass, so XLA does not backpropagate through a
    locked tower at all; the optimizer (wrapped by `freezing.freeze`) gives them zero updates.
    value_and_grad: optional (params, batch, rng) -> ((loss, metrics), grads) replacing autodiff
    of the objective, e.g. gradient accumulation over microbatches (contrastive/accumulation.py),
    which then handles `frozen` itself.
    prepare_batch: optional jax function applied to the batch inside the step, e.g. turning
    uint8 images (4x fewer bytes from host to device) into float32 on the device.
    norm_groups: optional {name: tree like the params, True for the group's leaves}
    (contrastive.freezing.group_masks): the metrics gain grad_norm_NAME and update_norm_NAME,
    e.g. to see how much of the gradient reaches the HET-XL noise layers.
    """

    def step(state: TrainState, batch: dict):
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        rng = jax.random.fold_in(state.rng, state.step)
        if value_and_grad is None:
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: objective(stop_frozen_gradients(p, frozen), batch, rng), has_aux=True
            )(state.params)
        else:
            (loss, metrics), grads = value_and_grad(state.params, batch, rng)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old
        )
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=state.rng,
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_updates=state.nonfinite_updates + 1 - finite.astype(jnp.int32),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state.params),
            "update_norm": optax.tree.norm(updates),
            "nonfinite": 1 - finite.astype(jnp.int32),
        }
        for name, mask in (norm_groups or {}).items():
            metrics[f"grad_norm_{name}"] = _masked_norm(grads, mask)
            metrics[f"update_norm_{name}"] = _masked_norm(updates, mask)
        return new_state, metrics

    batch_in = batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_in),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )
