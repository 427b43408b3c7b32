"""What an optim block may say: its keys, their defaults and checks, and the schedule's.

`validate_optim_config` fills in the defaults and keeps only the keys that apply to the named
optimizer; `validate_schedule` does the same for a schedule mapping with its peak learning rate.
Both check every key before anything is built: an unknown key, a value of the wrong type or
range, or a key that belongs to another optimizer or schedule raise one ValueError listing every
problem, one per line, each naming the key and listing the known ones. The keys are described in
contrastive/optim.py, the schedule's in `contrastive.learning_rate.learning_rate_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from contrastive.config_blocks import (
    boolean,
    int_at_least,
    is_int,
    mapping,
    one_of,
    optional,
    real,
    regexes,
)

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

MOMENTUM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _problem(where: str, key: str, problem: str, known: Sequence[str]) -> str:
    return f"{where}.{key}: {problem}. Known {where} keys: {', '.join(known)}"


def optim_key_error(key: str, problem: str) -> ValueError:
    """The error for a problem with optim.`key` found while building the optimizer."""
    return ValueError(_problem("optim", key, problem, list(OPTIM_DEFAULTS)))


def _raise_all(problems: list[str]) -> None:
    """One ValueError carrying every problem, one per line."""
    if problems:
        raise ValueError("\n".join(problems))


_INF = math.inf
_OPTIM_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": one_of(OPTIMIZER_NAMES),
    "lr": real(0.0, _INF, low_open=True, high_open=True),
    "weight_decay": real(0.0, _INF, high_open=True),
    "wd_rules": optional(regexes),
    "clip_norm": optional(real(0.0, _INF, low_open=True, high_open=True)),
    "freeze": regexes,
    "schedule": mapping,
    "b1": real(0.0, 1.0, high_open=True),
    "b2": real(0.0, 1.0, high_open=True),
    "eps": real(0.0, _INF, low_open=True, high_open=True),
    "momentum": optional(real(0.0, 1.0, high_open=True)),
    "nesterov": boolean,
    "momentum_dtype": one_of(tuple(MOMENTUM_DTYPES)),
    "decay_rate": real(0.0, 1.0, low_open=True),
    "min_dim_size_to_factor": int_at_least(1),
    "clipping_threshold": optional(real(0.0, _INF, low_open=True, high_open=True)),
    "multiply_by_parameter_scale": boolean,
}
_SCHEDULE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": one_of(SCHEDULE_NAMES),
    "warmup_steps": optional(int_at_least(0)),
    "warmup_fraction": optional(real(0.0, 1.0, high_open=True)),
    "end_lr_fraction": real(0.0, 1.0),
    "timescale": int_at_least(1),
    "cooldown_steps": int_at_least(0),
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
        problems.append(f"{where}: {mapping(config)}. Known {where} keys: {', '.join(known)}")
        return None
    before = len(problems)
    for key in config:
        if key not in defaults:
            problems.append(_problem(where, key, "unknown key", known))
    name = config.get("name", defaults["name"])
    problem = checks["name"](name)
    if problem:
        problems.append(_problem(where, f"name={name!r}", problem, known))
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
            problems.append(_problem(where, f"{key}={value!r}", problem, known))
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
    if not is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps: expected an integer >= 1, got {total_steps!r}")


def validate_schedule(
    schedule_config: Mapping[str, Any], peak_lr: float, total_steps: int
) -> dict[str, Any]:
    """The schedule mapping with defaults filled in, only the keys that apply to its name, and
    `warmup_steps` an int (from either warmup key).

    Raises ValueError for a bad total_steps or peak_lr, else one listing every bad schedule key.
    """
    _check_total_steps(total_steps)
    problem = _OPTIM_CHECKS["lr"](peak_lr)
    if problem:
        raise ValueError(f"peak_lr={peak_lr!r}: {problem}")
    problems: list[str] = []
    resolved = _resolve_schedule(schedule_config, total_steps, problems)
    _raise_all(problems)
    return resolved


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
