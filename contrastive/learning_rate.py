"""The learning rate as a function of the step: a linear warmup, then one of four shapes.

Cosine and linear come from optax; rsqrt and constant, of which optax has no version with a
final cooldown, are written here. The schedule mapping is validated
(contrastive/optim_config.py) before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive.optim_config import validate_schedule


def learning_rate_schedule(
    schedule_config: Mapping[str, Any], peak_lr: float, total_steps: int
) -> Callable[[int], jax.Array]:
    """The learning rate at each step (0 = the first update), traceable under jit.

    schedule_config keys (defaults in `contrastive.optim_config.SCHEDULE_DEFAULTS`):
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
    resolved = validate_schedule(schedule_config, peak_lr, total_steps)
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
