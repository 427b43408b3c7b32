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

Configs are validated in full before anything is built: an unknown key, a value of the wrong type or
range, a key that belongs to another optimizer or schedule, and a regex that matches no parameter
all raise ValueError naming the key and listing the known ones. `OPTIM_DEFAULTS` lists every key
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

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive import freezing

OPTIMIZER_NAMES = ("adamw", "adafactor", "sgd")
SCHEDULE_NAMES = ("cosine", "linear", "rsqrt", "constant")

SCHEDULE_DEFAULTS: dict[str, Any] = {
    "name": "cosine",
    # Neither warmup key set means no warmup; setting both is an error.
    "warmup_steps": None,
    "warmup_fraction": None,
    "end_lr_fraction": 0.0,
    "timescale": 10_000,
    "cooldown_steps": 0,
}

OPTIM_DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "wd_rules": None,
    "clip_norm": None,
    "freeze": [],
    "schedule": dict(SCHEDULE_DEFAULTS),
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "momentum": None,
    "nesterov": False,
    "momentum_dtype": "float32",
    "decay_rate": 0.8,
    "min_dim_size_to_factor": 128,
    "clipping_threshold": 1.0,
    "multiply_by_parameter_scale": False,
}

# Keys that only one optimizer (schedule) reads; every other key applies to all of them.
OPTIMIZER_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": ("b1", "b2", "eps"),
    "sgd": ("momentum", "nesterov", "momentum_dtype"),
    "adafactor": (
        "momentum",
        "momentum_dtype",
        "decay_rate",
        "min_dim_size_to_factor",
        "clipping_threshold",
        "multiply_by_parameter_scale",
    ),
}
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "cosine": ("end_lr_fraction",),
    "linear": ("end_lr_fraction",),
    "rsqrt": ("timescale", "cooldown_steps"),
    "constant": ("cooldown_steps",),
}

_MOMENTUM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _problem(where: str, key: str, problem: str, known: Sequence[str]) -> str:
    return f"{where}.{key}: {problem}. Known {where} keys: {', '.join(known)}"


def _fail(where: str, key: str, problem: str, known: Sequence[str]) -> ValueError:
    return ValueError(_problem(where, key, problem, known))


def _raise_all(problems: list[str]) -> None:
    """One ValueError carrying every problem, one per line."""
    if problems:
        raise ValueError("\n".join(problems))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_regex_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


# Each check returns the problem with a value, or None when it is fine.
def _real(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        if not _is_real(value) or not math.isfinite(value):
            return f"expected a finite number in {interval}, got {value!r}"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            return f"expected a number in {interval}, got {value!r}"
        return None

    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _int_at_least(low: int):
    def check(value: Any) -> str | None:
        if not _is_int(value) or value < low:
            return f"expected an integer >= {low}, got {value!r}"
        return None

    return check


def _one_of(choices: Sequence[str]):
    def check(value: Any) -> str | None:
        if value not in choices:
            return f"expected one of {list(choices)}, got {value!r}"
        return None

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected True or False, got {value!r}"


def _regexes(value: Any) -> str | None:
    if not _is_regex_list(value):
        return f"expected a list of regex strings, got {value!r}"
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            return f"{pattern!r} is not a valid regex ({err})"
    return None


def _mapping(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return None
    return f"expected a mapping (e.g. ConfigDict.to_dict()), got {type(value).__name__}"


_INF = math.inf
_OPTIM_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _one_of(OPTIMIZER_NAMES),
    "lr": _real(0.0, _INF, low_open=True, high_open=True),
    "weight_decay": _real(0.0, _INF, high_open=True),
    "wd_rules": _optional(_regexes),
    "clip_norm": _optional(_real(0.0, _INF, low_open=True, high_open=True)),
    "freeze": _regexes,
    "schedule": _mapping,
    "b1": _real(0.0, 1.0, high_open=True),
    "b2": _real(0.0, 1.0, high_open=True),
    "eps": _real(0.0, _INF, low_open=True, high_open=True),
    "momentum": _optional(_real(0.0, 1.0, high_open=True)),
    "nesterov": _bool,
    "momentum_dtype": _one_of(tuple(_MOMENTUM_DTYPES)),
    "decay_rate": _real(0.0, 1.0, low_open=True),
    "min_dim_size_to_factor": _int_at_least(1),
    "clipping_threshold": _optional(_real(0.0, _INF, low_open=True, high_open=True)),
    "multiply_by_parameter_scale": _bool,
}
_SCHEDULE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _one_of(SCHEDULE_NAMES),
    "warmup_steps": _optional(_int_at_least(0)),
    "warmup_fraction": _optional(_real(0.0, 1.0, high_open=True)),
    "end_lr_fraction": _real(0.0, 1.0),
    "timescale": _int_at_least(1),
    "cooldown_steps": _int_at_least(0),
}


def _resolve(
    config: Any,
    where: str,
    defaults: Mapping[str, Any],
    checks: Mapping[str, Callable[[Any], str | None]],
    specific: Mapping[str, tuple[str, ...]],
    problems: list[str],
) -> dict[str, Any] | None:
    """Defaults filled in, every given key checked; keys of another variant are rejected.

    Every problem found is appended to `problems`; returns None when the block is unusable.
    """
    known = list(defaults)
    if not isinstance(config, Mapping):
        problems.append(f"{where}: {_mapping(config)}. Known {where} keys: {', '.join(known)}")
        return None
    before = len(problems)
    for key in config:
        if key not in defaults:
            problems.append(_problem(where, key, "unknown key", known))
    name = config.get("name", defaults["name"])
    problem = checks["name"](name)
    if problem:
        problems.append(_problem(where, "name", problem, known))
    own_keys = set() if problem else set(specific[name])
    for key, value in config.items():
        if key not in defaults or key == "name":
            continue
        owners = [n for n, keys in specific.items() if key in keys]
        if owners and problem:
            continue  # whether it applies depends on the name
        # At its default value another variant's key is inert, which lets a config start from
        # the full defaults; any other value would be silently ignored, so it is an error.
        if owners and key not in own_keys and value != defaults[key]:
            problems.append(
                _problem(where, key, f"applies to name in {owners} only, not {name!r}", known)
            )
            continue
        problem = checks[key](value)
        if problem:
            problems.append(_problem(where, key, problem, known))
    if len(problems) > before:
        return None
    all_specific = {k for keys in specific.values() for k in keys}
    return {
        key: config.get(key, default)
        for key, default in defaults.items()
        if key not in all_specific or key in own_keys
    }


def _resolve_schedule(schedule: Any, total_steps: int, problems: list[str]) -> dict | None:
    """Schedule mapping with defaults and `warmup_steps` as an int (from either warmup key);
    None (and the reasons appended to `problems`) when it is invalid."""
    resolved = _resolve(
        schedule, "schedule", SCHEDULE_DEFAULTS, _SCHEDULE_CHECKS, SCHEDULE_KEYS, problems
    )
    if resolved is None:
        return None
    known = list(SCHEDULE_DEFAULTS)
    fraction = resolved.pop("warmup_fraction")
    if fraction is not None and resolved["warmup_steps"] is not None:
        problems.append(
            _problem(
                "schedule", "warmup_fraction", "set either it or warmup_steps, not both", known
            )
        )
        return None
    if fraction is not None:
        resolved["warmup_steps"] = round(fraction * total_steps)
    elif resolved["warmup_steps"] is None:
        resolved["warmup_steps"] = 0
    warmup = resolved["warmup_steps"]
    cooldown = resolved.get("cooldown_steps", 0)
    before = len(problems)
    if warmup + cooldown > total_steps:
        key = "cooldown_steps" if cooldown else "warmup_steps"
        problems.append(
            _problem(
                "schedule",
                key,
                f"warmup ({warmup}) + cooldown ({cooldown}) steps exceed total_steps "
                f"({total_steps})",
                known,
            )
        )
    elif resolved["name"] in ("cosine", "linear") and warmup >= total_steps:
        problems.append(
            _problem(
                "schedule",
                "warmup_steps",
                f"leaves no decay steps in total_steps={total_steps}",
                known,
            )
        )
    if resolved["name"] == "rsqrt" and resolved["timescale"] < warmup:
        # lr = peak * sqrt(timescale / step) would already be below peak when warmup ends: a jump.
        problems.append(
            _problem(
                "schedule",
                "timescale",
                f"must be >= warmup steps ({warmup}) so the decay starts at the peak",
                known,
            )
        )
    return None if len(problems) > before else resolved


def _check_total_steps(total_steps: Any) -> None:
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")


def learning_rate_schedule(
    schedule_config: Mapping[str, Any], peak_lr: float, total_steps: int
) -> Callable[[int], jax.Array]:
    """The learning rate at each step (0 = the first update), traceable under jit.

    schedule_config keys (defaults in `SCHEDULE_DEFAULTS`):
        name: "cosine" | "linear" | "rsqrt" | "constant": the shape after warmup.
        warmup_steps: linear warmup from 0 (step 0) to `peak_lr` (step warmup_steps).
        warmup_fraction: warmup as a fraction of total_steps in [0, 1), instead of warmup_steps.
        end_lr_fraction (cosine, linear): the value at total_steps as a fraction of peak_lr.
        timescale (rsqrt): after warmup, lr = peak_lr * sqrt(timescale / max(step, timescale)),
            i.e. flat until `timescale`, then inverse square root; must be >= warmup steps.
        cooldown_steps (rsqrt, constant): multiply by a linear ramp to 0 over the last
            cooldown_steps, so that an open-ended schedule still ends at lr 0.
    Cosine and linear decay from peak_lr at warmup end to end_lr_fraction * peak_lr at
    total_steps; steps past total_steps keep the end value.
    """
    _check_total_steps(total_steps)
    problem = _OPTIM_CHECKS["lr"](peak_lr)
    if problem:
        raise ValueError(f"peak_lr: {problem}")
    problems: list[str] = []
    resolved = _resolve_schedule(schedule_config, total_steps, problems)
    _raise_all(problems)
    name, warmup = resolved["name"], resolved["warmup_steps"]
    peak = float(peak_lr)
    decay_steps = total_steps - warmup
    if name == "cosine":
        after_warmup = optax.cosine_decay_schedule(
            peak, decay_steps, alpha=resolved["end_lr_fraction"]
        )
    elif name == "linear":
        after_warmup = optax.linear_schedule(peak, peak * resolved["end_lr_fraction"], decay_steps)
    else:
        after_warmup = _open_ended(name, resolved, peak, warmup, total_steps)
    if warmup:
        after_warmup = optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup]
        )
    return lambda step: jnp.asarray(after_warmup(step), jnp.float32)


def _open_ended(name: str, resolved: dict, peak: float, warmup: int, total_steps: int):
    """rsqrt or constant after warmup (optax has neither with a final cooldown), as a function
    of the steps since warmup ended."""

    def schedule(steps_after_warmup):
        step = jnp.asarray(steps_after_warmup, jnp.float32) + warmup
        if name == "rsqrt":
            timescale = resolved["timescale"]
            lr = peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))
        else:
            lr = jnp.full_like(step, peak)
        cooldown = resolved["cooldown_steps"]
        if cooldown:
            lr = lr * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
        return lr

    return schedule


def validate_optim_config(optim: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """The config with defaults filled in, only the keys that apply, schedule resolved.

    Raises ValueError listing every bad key, one per line; checks that need the parameters
    (regexes that match nothing) happen in `make_optimizer`.
    """
    _check_total_steps(total_steps)
    problems: list[str] = []
    resolved = _resolve(optim, "optim", OPTIM_DEFAULTS, _OPTIM_CHECKS, OPTIMIZER_KEYS, problems)
    known = list(OPTIM_DEFAULTS)
    schedule = (
        optim.get("schedule", OPTIM_DEFAULTS["schedule"]) if isinstance(optim, Mapping) else {}
    )
    if isinstance(schedule, Mapping):
        schedule = _resolve_schedule(schedule, total_steps, problems)
    if resolved is None:
        _raise_all(problems)
    if resolved["name"] == "sgd" and resolved["nesterov"] and resolved["momentum"] is None:
        problems.append(_problem("optim", "nesterov", "needs a momentum", known))
    if resolved["weight_decay"] > 0 and resolved["wd_rules"] is not None:
        if not resolved["wd_rules"]:
            problems.append(
                _problem(
                    "optim",
                    "wd_rules",
                    "is empty while weight_decay > 0; set weight_decay=0",
                    known,
                )
            )
    _raise_all(problems)
    resolved["schedule"] = schedule
    resolved["wd_rules"] = None if resolved["wd_rules"] is None else list(resolved["wd_rules"])
    resolved["freeze"] = list(resolved["freeze"])
    return resolved


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
            raise _fail(
                "optim",
                "wd_rules",
                f"rule {rule.pattern!r} matches {what}; parameter names look like {names[:5]}",
                list(OPTIM_DEFAULTS),
            )
    return {name: any(rule.fullmatch(name) for rule in compiled) for name in names}


def _direction(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimizer's update direction before weight decay and learning rate."""
    name = config["name"]
    if name == "adamw":
        return optax.scale_by_adam(b1=config["b1"], b2=config["b2"], eps=config["eps"])
    momentum_dtype = _MOMENTUM_DTYPES[config["momentum_dtype"]]
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
        raise _fail("optim", "freeze", str(err), list(OPTIM_DEFAULTS)) from None
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
