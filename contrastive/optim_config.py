"""What an optim block may say: its keys, their defaults and checks, and the schedule's.

`OptimConfig` and `ScheduleConfig` are config blocks (data/config_blocks.py): every key of every
optimizer (schedule) is a field with its default and check. `validate_optim_config` builds the
block, keeps only the keys that apply to the named optimizer and resolves its schedule;
`validate_schedule` does the same for a schedule mapping with its peak learning rate. Both check
every key before anything is built and raise one ConfigError listing every problem, one line each:

    optim: unknown key(s) ['lrate']; known: ['b1', 'b2', ...]
    optim.b2: applies to name in ['adamw'] only, not 'sgd'
    optim.schedule.warmup_steps=-1: expected an integer >= 0

The keys are described in contrastive/optim.py, the schedule's in
`contrastive.learning_rate.learning_rate_schedule`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from data.config_blocks import (
    ConfigError,
    boolean,
    build_block,
    defaults,
    int_at_least,
    mapping,
    one_of,
    optional,
    real,
    regexes,
    setting,
)

OPTIMIZER_NAMES = ("adamw", "adafactor", "sgd")
SCHEDULE_NAMES = ("cosine", "linear", "rsqrt", "constant")
MOMENTUM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

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

_INF = math.inf
_POSITIVE = real(0.0, _INF, low_open=True, high_open=True)


def _variant_problems(block: Any, variant_keys: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Keys that only another variant (optimizer, schedule) reads. At its default value such a
    key is inert, which lets a config start from the full defaults; any other value would be
    silently ignored, so it is an error."""
    own = set(variant_keys[block.name])
    problems = []
    for field in dataclasses.fields(block):
        owners = [name for name, keys in variant_keys.items() if field.name in keys]
        if owners and field.name not in own and getattr(block, field.name) != field.default:
            problems.append(f"{field.name}: applies to name in {owners} only, not {block.name!r}")
    return problems


def _applicable(block: Any, variant_keys: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """{key: value} of the keys the block's variant reads (shared keys and its own)."""
    specific = {key for keys in variant_keys.values() for key in keys}
    own = set(variant_keys[block.name])
    return {
        field.name: getattr(block, field.name)
        for field in dataclasses.fields(block)
        if field.name not in specific or field.name in own
    }


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The optim block's `schedule` (keys described in contrastive/learning_rate.py)."""

    name: str = setting("cosine", one_of(SCHEDULE_NAMES))
    # Neither warmup key set means no warmup; setting both is an error.
    warmup_steps: int | None = setting(None, optional(int_at_least(0)))
    warmup_fraction: float | None = setting(None, optional(real(0.0, 1.0, high_open=True)))
    end_lr_fraction: float = setting(0.0, real(0.0, 1.0))
    timescale: int = setting(10_000, int_at_least(1))
    cooldown_steps: int = setting(0, int_at_least(0))

    def problems(self) -> list[str]:
        problems = _variant_problems(self, SCHEDULE_KEYS)
        if self.warmup_fraction is not None and self.warmup_steps is not None:
            problems.append("warmup_fraction: set either it or warmup_steps, not both")
        return problems

    def warmup(self, total_steps: int) -> int:
        """Warmup steps in a run of `total_steps` updates, from either warmup key (0: neither)."""
        if self.warmup_fraction is not None:
            return round(self.warmup_fraction * total_steps)
        return self.warmup_steps or 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The config's `optim` block (keys described in contrastive/optim.py)."""

    name: str = setting("adamw", one_of(OPTIMIZER_NAMES))
    lr: float = setting(1e-3, _POSITIVE)
    weight_decay: float = setting(0.0, real(0.0, _INF, high_open=True))
    wd_rules: list[str] | None = setting(None, optional(regexes))
    clip_norm: float | None = setting(None, optional(_POSITIVE))
    freeze: list[str] = setting(check=regexes, default_factory=list)
    schedule: dict[str, Any] = setting(
        check=mapping, default_factory=lambda: defaults(ScheduleConfig)
    )
    b1: float = setting(0.9, real(0.0, 1.0, high_open=True))
    b2: float = setting(0.999, real(0.0, 1.0, high_open=True))
    eps: float = setting(1e-8, _POSITIVE)
    momentum: float | None = setting(None, optional(real(0.0, 1.0, high_open=True)))
    nesterov: bool = setting(False, boolean)
    momentum_dtype: str = setting("float32", one_of(tuple(MOMENTUM_DTYPES)))
    decay_rate: float = setting(0.8, real(0.0, 1.0, low_open=True))
    min_dim_size_to_factor: int = setting(128, int_at_least(1))
    clipping_threshold: float | None = setting(1.0, optional(_POSITIVE))
    multiply_by_parameter_scale: bool = setting(False, boolean)

    def problems(self) -> list[str]:
        problems = _variant_problems(self, OPTIMIZER_KEYS)
        if self.name == "sgd" and self.nesterov and self.momentum is None:
            problems.append("nesterov: needs a momentum")
        if self.weight_decay > 0 and self.wd_rules is not None and not self.wd_rules:
            problems.append("wd_rules: is empty while weight_decay > 0; set weight_decay=0")
        return problems


# Every key with its default, so that a config may start from all of them.
SCHEDULE_DEFAULTS: dict[str, Any] = defaults(ScheduleConfig)
OPTIM_DEFAULTS: dict[str, Any] = defaults(OptimConfig)


def optim_key_error(key: str, problem: str) -> ConfigError:
    """The error for a problem with optim.`key` found while building the optimizer."""
    return ConfigError([f"optim.{key}: {problem}"])


def _run_length_problems(schedule: ScheduleConfig, total_steps: int) -> list[str]:
    """Lines "key: rule" for a schedule that does not fit in `total_steps` updates."""
    warmup = schedule.warmup(total_steps)
    # At its default 0 where the schedule has no cooldown (the variant rule holds it there).
    cooldown = schedule.cooldown_steps
    problems = []
    if warmup + cooldown > total_steps:
        key = "cooldown_steps" if cooldown else "warmup_steps"
        problems.append(
            f"{key}: warmup ({warmup}) + cooldown ({cooldown}) steps exceed total_steps "
            f"({total_steps})"
        )
    elif schedule.name in ("cosine", "linear") and warmup >= total_steps:
        problems.append(f"warmup_steps: leaves no decay steps in total_steps={total_steps}")
    if schedule.name == "rsqrt" and schedule.timescale < warmup:
        # lr = peak * sqrt(timescale / step) would already be below peak when warmup ends: a jump.
        problems.append(
            f"timescale: must be >= warmup steps ({warmup}) so the decay starts at the peak"
        )
    return problems


def _resolve_schedule(
    values: Any, total_steps: int, where: str, problems: list[str]
) -> dict[str, Any] | None:
    """The schedule's applicable keys with `warmup_steps` an int (from either warmup key); None,
    with the reasons appended to `problems`, when it is invalid."""
    schedule, found = build_block(ScheduleConfig, values, where)
    if found:
        problems.extend(found)
        return None
    found = _run_length_problems(schedule, total_steps)
    if found:
        problems.extend(f"{where}.{line}" for line in found)
        return None
    resolved = _applicable(schedule, SCHEDULE_KEYS)
    del resolved["warmup_fraction"]
    resolved["warmup_steps"] = schedule.warmup(total_steps)
    return resolved


def _check_total_steps(total_steps: Any) -> None:
    problem = int_at_least(1)(total_steps)
    if problem:
        raise ConfigError([f"total_steps={total_steps!r}: {problem}"])


def validate_schedule(
    schedule_config: Mapping[str, Any], peak_lr: float, total_steps: int
) -> dict[str, Any]:
    """The schedule mapping with defaults filled in, only the keys that apply to its name, and
    `warmup_steps` an int (from either warmup key).

    Raises ConfigError for a bad total_steps or peak_lr, else one listing every bad schedule key.
    """
    _check_total_steps(total_steps)
    problem = _POSITIVE(peak_lr)
    if problem:
        raise ConfigError([f"peak_lr={peak_lr!r}: {problem}"])
    problems: list[str] = []
    resolved = _resolve_schedule(schedule_config, total_steps, "schedule", problems)
    if problems:
        raise ConfigError(problems)
    return resolved


def validate_optim_config(optim: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """The config with defaults filled in, only the keys that apply, schedule resolved.

    Raises ConfigError listing every bad key, one per line; checks that need the parameters
    (regexes that match nothing) happen in `make_optimizer`.
    """
    _check_total_steps(total_steps)
    block, problems = build_block(OptimConfig, optim, "optim")
    # The schedule is checked even when the rest of the block is not, so that every problem is
    # reported at once; a schedule that is not a mapping is the optim block's problem.
    values = optim.to_dict() if hasattr(optim, "to_dict") else optim
    given = values.get("schedule", {}) if isinstance(values, Mapping) else {}
    schedule = None
    if isinstance(given, Mapping):
        schedule = _resolve_schedule(given, total_steps, "optim.schedule", problems)
    if problems:
        raise ConfigError(problems)
    resolved = _applicable(block, OPTIMIZER_KEYS)
    resolved["schedule"] = schedule
    resolved["wd_rules"] = None if block.wd_rules is None else list(block.wd_rules)
    resolved["freeze"] = list(block.freeze)
    return resolved
