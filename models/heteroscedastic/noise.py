"""Input-dependent Gaussian noise: Sigma(x) = V(x) V(x)^T + diag(d(x)^2) in an N-dim space.

N is the number of classes K for HET (noise on the logits) and the pre-logit dimension D for
HET-XL (noise on the pre-logits, so the parameter count does not depend on K). See HETXL.md
section 2 for the parameterisation and section 6 for the facts the tests pin.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

DIAG_MODES = ("per_dim", "shared_scalar")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Covariance parameterisation of a heteroscedastic head (how its noise is sampled is the
    separate `Sampling` block, shared with the contrastive loss).

    Attributes:
      num_factors: R, the rank of the low-rank part V(x).
      parameter_efficient: V(x) = diag(v(x)) J^T with a learned R x N matrix J (and a learned mean
        shift c * v(x)); otherwise V(x) is a full N x R output of a dense layer.
      diag_mode: "per_dim" draws the diagonal noise independently per dimension (the papers'
        model); "shared_scalar" draws one scalar per (example, sample) and broadcasts it over the
        dimensions (the reference JAX code), which makes that term d d^T.
      min_scale: floor of the diagonal scale d(x) = softplus(.) + min_scale.
      diag_scale_init: initial d(x) for zero input (sets the diag bias); None: bias 0, d ~ 0.69.
      kernel_init_scale: multiplies the standard deviation of the noise layers' initial kernels.
        Contrastive models start with unit-norm embeddings: small initial noise (e.g. scale 0.01
        and diag_scale_init 0.01) lets the deterministic part learn first.
    """

    num_factors: int = 10
    parameter_efficient: bool = True
    diag_mode: str = "per_dim"
    min_scale: float = 1e-3
    diag_scale_init: float | None = None
    kernel_init_scale: float = 1.0

    def __post_init__(self):
        if self.diag_mode not in DIAG_MODES:
            raise ValueError(f"diag_mode {self.diag_mode!r} is unknown; known: {DIAG_MODES}")
        if self.num_factors < 1:
            raise ValueError(f"num_factors must be >= 1, got {self.num_factors}")
        if self.min_scale < 0:
            raise ValueError(f"min_scale must be >= 0, got {self.min_scale}")
        if self.diag_scale_init is not None and self.diag_scale_init <= self.min_scale:
            raise ValueError(
                f"diag_scale_init {self.diag_scale_init} must exceed min_scale {self.min_scale}"
            )


@struct.dataclass
class NoiseParameters:
    """Per-example noise eps = mean_shift + factors @ e_R + diag_scale * e_N.

    Attributes:
      factors: V(x), f32[B, N, R].
      diag_scale: d(x), f32[B, N], a standard deviation (not a variance), >= min_scale.
      mean_shift: c * v(x), f32[B, N], or None (full parameterisation has no shift).
      shared_scalar_diag: whether e_N is one scalar per (example, sample).
    """

    factors: jax.Array
    diag_scale: jax.Array
    mean_shift: jax.Array | None = None
    shared_scalar_diag: bool = struct.field(pytree_node=False, default=False)

    def covariance(self) -> jax.Array:
        """Sigma(x), f32[B, N, N]: V V^T plus diag(d^2) or, in shared-scalar mode, d d^T."""
        low_rank = jnp.einsum("bnr,bmr->bnm", self.factors, self.factors)
        if self.shared_scalar_diag:
            return low_rank + jnp.einsum("bn,bm->bnm", self.diag_scale, self.diag_scale)
        return low_rank + jax.vmap(jnp.diag)(self.diag_scale**2)


class HeteroscedasticNoise(nn.Module):
    """Maps features phi(x) f32[B, D] to NoiseParameters in an N-dim space (N = D if noise_dim
    is None, the HET-XL case where the noise lives in the features' own space).

    Parameters (parameter-efficient form, 2*D*N + (R + 3)*N in all):
      diag_scale/{kernel,bias}: d(x) = softplus(phi W_d + b_d) + min_scale;
      factor_scale/{kernel,bias}: v(x) = phi W_v + b_v;
      factor_loadings f32[R, N]: J; factor_shift f32[N]: c.
    Full form ((D + 1)(R + 1) N in all): diag_scale as above and factors/{kernel,bias} giving
    V(x) = reshape(phi W_V + b_V, [N, R]).
    """

    noise_dim: int | None = None
    config: NoiseConfig = NoiseConfig()

    @nn.compact
    def __call__(self, features: jax.Array) -> NoiseParameters:
        config = self.config
        n = features.shape[-1] if self.noise_dim is None else self.noise_dim
        r = config.num_factors
        kernel_init = nn.initializers.variance_scaling(
            config.kernel_init_scale**2, "fan_in", "truncated_normal"
        )
        diag_bias = 0.0
        if config.diag_scale_init is not None:  # inverse softplus of the wanted initial scale
            diag_bias = math.log(math.expm1(config.diag_scale_init - config.min_scale))
        diag_layer = nn.Dense(
            n,
            kernel_init=kernel_init,
            bias_init=nn.initializers.constant(diag_bias),
            name="diag_scale",
        )
        diag_scale = jax.nn.softplus(diag_layer(features)) + config.min_scale
        if config.parameter_efficient:
            factor_scale = nn.Dense(n, kernel_init=kernel_init, name="factor_scale")(features)
            loadings = self.param(
                "factor_loadings", nn.initializers.lecun_normal(), (r, n), jnp.float32
            )
            shift = self.param("factor_shift", nn.initializers.zeros, (n,), jnp.float32)
            factors = factor_scale[:, :, None] * loadings.T[None, :, :]
            mean_shift = factor_scale * shift
        else:
            flat = nn.Dense(n * r, kernel_init=kernel_init, name="factors")(features)
            factors = flat.reshape(features.shape[:-1] + (n, r))
            mean_shift = None
        return NoiseParameters(
            factors=factors,
            diag_scale=diag_scale,
            mean_shift=mean_shift,
            shared_scalar_diag=config.diag_mode == "shared_scalar",
        )
