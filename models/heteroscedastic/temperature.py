"""Softmax/sigmoid temperature: fixed, learned inside bounds, or CLIP's unbounded log-scale.

HET-XL learns its temperature on the training loss (HETXL.md section 3):
    bounded:      tau = lo + (hi - lo) * sigmoid(t)
    bounded_log:  log tau = log lo + (log hi - log lo) * sigmoid(t)
with a scalar parameter t. The log-space bound moves tau multiplicatively, which matters near
tau ~ 0.01-0.1 (contrastive models) where the linear map barely moves under Adam.
    log_scale:    tau = exp(-s), s unbounded (CLIP's learned logit scale 1/tau).
    fixed:        tau is a constant (the HET baseline tunes it on held-out data).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

TEMPERATURE_MODES = ("fixed", "bounded", "bounded_log", "log_scale")


@dataclasses.dataclass(frozen=True)
class TemperatureConfig:
    """How the temperature is obtained.

    Attributes:
      mode: one of TEMPERATURE_MODES.
      init: initial tau. None means the midpoint of the bounds (t = 0) for the bounded modes,
        1.0 for "fixed" and 0.07 (CLIP) for "log_scale".
      lo, hi: bounds of the bounded modes, 0 < lo < hi. Ignored otherwise.
    """

    mode: str = "bounded"
    init: float | None = None
    lo: float = 0.05
    hi: float = 5.0

    def __post_init__(self):
        if self.mode not in TEMPERATURE_MODES:
            raise ValueError(
                f"temperature mode {self.mode!r} is unknown; known: {TEMPERATURE_MODES}"
            )
        if self.mode in ("bounded", "bounded_log"):
            if not 0 < self.lo < self.hi:
                raise ValueError(
                    f"temperature bounds need 0 < lo < hi, got lo={self.lo}, hi={self.hi}"
                )
            if self.init is not None and not self.lo < self.init < self.hi:
                raise ValueError(
                    f"temperature init {self.init} is outside the bounds ({self.lo}, {self.hi})"
                )
        elif self.init is not None and self.init <= 0:
            raise ValueError(f"temperature init must be positive, got {self.init}")

    @property
    def learned(self) -> bool:
        return self.mode != "fixed"


def bounded_tau(t: jax.Array, lo: float, hi: float) -> jax.Array:
    """tau = lo + (hi - lo) * sigmoid(t); tau(0) = (lo + hi) / 2."""
    return lo + (hi - lo) * jax.nn.sigmoid(t)


def bounded_log_tau(t: jax.Array, lo: float, hi: float) -> jax.Array:
    """log tau = log lo + (log hi - log lo) * sigmoid(t); tau(0) = sqrt(lo * hi)."""
    return jnp.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * jax.nn.sigmoid(t))


def initial_parameter(config: TemperatureConfig) -> float | None:
    """The value of the learned scalar that gives tau = config.init (None for fixed tau)."""
    if config.mode == "fixed":
        return None
    if config.mode == "log_scale":
        return -math.log(0.07 if config.init is None else config.init)
    if config.init is None:
        return 0.0
    if config.mode == "bounded":
        fraction = (config.init - config.lo) / (config.hi - config.lo)
    else:
        fraction = (math.log(config.init) - math.log(config.lo)) / (
            math.log(config.hi) - math.log(config.lo)
        )
    return math.log(fraction) - math.log1p(-fraction)


class Temperature(nn.Module):
    """Returns the scalar temperature tau; owns at most one scalar parameter.

    Parameter names: "t" (bounded modes) or "log_scale" (CLIP mode); none when fixed.
    """

    config: TemperatureConfig = TemperatureConfig()

    @nn.compact
    def __call__(self) -> jax.Array:
        config = self.config
        if config.mode == "fixed":
            return jnp.asarray(1.0 if config.init is None else config.init, jnp.float32)
        init_value = initial_parameter(config)
        name = "log_scale" if config.mode == "log_scale" else "t"
        param = self.param(name, nn.initializers.constant(init_value), (), jnp.float32)
        if config.mode == "log_scale":
            return jnp.exp(-param)
        if config.mode == "bounded":
            return bounded_tau(param, config.lo, config.hi)
        return bounded_log_tau(param, config.lo, config.hi)
