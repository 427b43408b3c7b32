"""The optimizer block of the trainer: one validated mapping in, one optax transformation out.

`make_optimizer(config.optim.to_dict(), total_steps, params)` builds, from the outside in:

    freeze(                                   # LiT: frozen leaves get zero updates, no state
        chain(
            clip_by_global_norm(clip_norm),    # on trainable gradients only
            <adamw | adafactor | sgd direction>,
            masked(add_decayed_weights(weight_decay), wd_rules),
            scale_by_learning_rate(schedule),  # peak lr x warmup/decay shape
        )
    )

so every parameter moves by `-lr(step) * (direction + weight_decay * param)`. Weight decay is
decoupled from the gradient statistics and scaled by the same schedule, exactly as `optax.adamw`
does, and it means the same thing for every optimizer name.

The block's keys, defaults and validation live in contrastive/optim_config.py, the learning-rate
schedule in contrastive/learning_rate.py and frozen parameters in contrastive/freezing.py; this
module assembles the transformation and also exports the names a caller of the block needs.

Configs are validated in full before anything is built: an unknown key (the known ones listed), a
value of the wrong type or range, a key that belongs to another optimizer or schedule, and a regex
that matches no parameter all raise ConfigError, one line per problem naming the key and the rule
(`optim.b2: applies to name in ['adamw'] only, not 'sgd'`). `OPTIM_DEFAULTS` lists every key
with its default, so a config may start from all of it; keys listed in `OPTIMIZER_KEYS` /
`SCHEDULE_KEYS` apply only to the named optimizer / schedule, and elsewhere must keep their default
value, because e.g. `b2=0.95` under SGD would otherwise be silently ignored.

Optimizer keys (top level):
    name: "adamw" | "adafactor" | "sgd".
    lr: peak learning rate, > 0.
    weight_decay: decoupled decay coefficient, >= 0, multiplied by lr(step) like optax.adamw.
    wd_rules: regexes fully matched against "/"-joined parameter paths that receive weight decay;
        None means every parameter with ndim >= 2 (kernels, embeddings), not biases, LayerNorm
        scales or the temperature.
    clip_norm: clip gradients to this global norm before the optimizer; None disables.
    freeze: regexes of parameters to freeze (see `contrastive.freezing`).
    schedule: mapping, see `learning_rate_schedule`.
    b1, b2, eps (adamw): Adam's moment decays and denominator epsilon.
    momentum (sgd, adafactor): heavy-ball momentum decay, None for none.
    nesterov (sgd): Nesterov momentum (needs momentum).
    momentum_dtype (sgd, adafactor): "float32" | "bfloat16" storage of the momentum buffer.
    decay_rate (adafactor): second-moment decay exponent, beta2(t) = 1 - t^-decay_rate.
    min_dim_size_to_factor (adafactor): factor the second moment of a leaf whose two largest
        dimensions are both at least this big; smaller leaves keep a full second moment.
    clipping_threshold (adafactor): clip each leaf's update to this RMS; None disables.
    multiply_by_parameter_scale (adafactor): scale updates by each leaf's RMS (relative step
        size, as in the Adafactor paper); off by default so `lr` is an absolute step size as for
        the other optimizers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive import freezing
from contrastive.learning_rate import learning_rate_schedule
from contrastive.optim_config import (
    MOMENTUM_DTYPES,
    OPTIM_DEFAULTS,
    OPTIMIZER_KEYS,
    OPTIMIZER_NAMES,
    SCHEDULE_DEFAULTS,
    SCHEDULE_KEYS,
    SCHEDULE_NAMES,
    optim_key_error,
    validate_optim_config,
)

__all__ = [
    "OPTIMIZER_KEYS",
    "OPTIMIZER_NAMES",
    "OPTIM_DEFAULTS",
    "SCHEDULE_DEFAULTS",
    "SCHEDULE_KEYS",
    "SCHEDULE_NAMES",
    "learning_rate_schedule",
    "make_optimizer",
    "validate_optim_config",
]


def _decay_by_name(params: Any, wd_rules: list[str] | None, trainable: set[str]) -> dict[str, bool]:
    """Which parameters receive weight decay, by name; rules must match a trainable parameter."""
    names = freezing.parameter_names(params)
    if wd_rules is None:
        # Matrices and embeddings, not vectors/scalars (biases, norms, temperature).
        shapes = [getattr(leaf, "shape", jnp.shape(leaf)) for leaf in jax.tree.leaves(params)]
        return {name: len(shape) >= 2 for name, shape in zip(names, shapes, strict=True)}
    compiled = [re.compile(rule) for rule in wd_rules]
    for rule in compiled:
        matched = [n for n in names if rule.fullmatch(n)]
        if not matched or not trainable.intersection(matched):
            what = "no parameter" if not matched else "only frozen parameters"
            raise optim_key_error(
                "wd_rules",
                f"rule {rule.pattern!r} matches {what}; parameter names look like {names[:5]}",
            )
    return {name: any(rule.fullmatch(name) for rule in compiled) for name in names}


def _direction(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimizer's update direction before weight decay and learning rate."""
    name = config["name"]
    if name == "adamw":
        return optax.scale_by_adam(b1=config["b1"], b2=config["b2"], eps=config["eps"])
    momentum_dtype = MOMENTUM_DTYPES[config["momentum_dtype"]]
    if name == "sgd":
        if config["momentum"] is None:
            return optax.identity()
        return optax.trace(
            decay=config["momentum"],
            nesterov=config["nesterov"],
            accumulator_dtype=momentum_dtype,
        )
    # Adafactor as in optax.adafactor, minus its own lr and weight decay, which the shared chain
    # applies (optax.adafactor adds weight decay after the learning rate, unscaled by it).
    parts = [
        optax.scale_by_factored_rms(
            factored=True,
            decay_rate=config["decay_rate"],
            min_dim_size_to_factor=config["min_dim_size_to_factor"],
        )
    ]
    if config["clipping_threshold"] is not None:
        parts.append(optax.clip_by_block_rms(config["clipping_threshold"]))
    if config["multiply_by_parameter_scale"]:
        parts.append(optax.scale_by_param_block_rms())
    if config["momentum"] is not None:
        parts.append(optax.ema(config["momentum"], debias=False, accumulator_dtype=momentum_dtype))
    return optax.chain(*parts)


def make_optimizer(
    optim: Mapping[str, Any], total_steps: int, params: Any
) -> tuple[optax.GradientTransformation, Callable[[int], jax.Array]]:
    """Builds (transformation, lr schedule) from a plain mapping such as config.optim.to_dict().

    total_steps: number of updates in the run; the schedule's decay and cooldown end there.
    params: the parameter tree (arrays or jax.ShapeDtypeStruct), used to resolve `wd_rules` and
        `freeze` into masks and to reject rules that match nothing; `init` must later be given a
        tree with the same parameter names.
    The schedule is the one the transformation applies, for logging lr(step).
    """
    config = validate_optim_config(optim, total_steps)
    try:
        labels = freezing.frozen_labels(params, config["freeze"])
    except ValueError as err:
        raise optim_key_error("freeze", str(err)) from None
    names = freezing.parameter_names(params)
    trainable = {
        name
        for name, label in zip(names, jax.tree.leaves(labels), strict=True)
        if label == freezing.TRAINABLE
    }
    schedule = learning_rate_schedule(config["schedule"], config["lr"], total_steps)

    parts = []
    if config["clip_norm"] is not None:
        parts.append(optax.clip_by_global_norm(config["clip_norm"]))
    parts.append(_direction(config))
    if config["weight_decay"] > 0:
        decay_by_name = _decay_by_name(params, config["wd_rules"], trainable)

        def decay_mask(tree: Any) -> Any:
            # Called on whatever tree reaches this point, which under `freeze` lacks the frozen
            # leaves, so the mask is rebuilt from names rather than stored as a fixed tree.
            tree_names = freezing.parameter_names(tree)
            missing = [n for n in tree_names if n not in decay_by_name]
            if missing:
                raise ValueError(
                    f"Parameters {missing[:5]} were not in the tree given to make_optimizer"
                )
            mask = [decay_by_name[n] for n in tree_names]
            return jax.tree.unflatten(jax.tree.structure(tree), mask)

        parts.append(optax.masked(optax.add_decayed_weights(config["weight_decay"]), decay_mask))
    elif config["wd_rules"] is not None:
        # Still reject typos, so that turning weight decay on later does not surface them.
        _decay_by_name(params, config["wd_rules"], trainable)
    parts.append(optax.scale_by_learning_rate(schedule))
    # Outermost, so clipping and optimizer state only ever see trainable leaves.
    return freezing.freeze(optax.chain(*parts), config["freeze"]), schedule
