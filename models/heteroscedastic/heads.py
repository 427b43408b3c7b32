"""DET, HET and HET-XL classification heads with one API (HETXL.md section 1).

    head = HeteroscedasticHead(num_classes=K, kind="hetxl")
    params = head.init({"params": key, "noise": key}, pre_logits)
    log_probs = head.apply(params, pre_logits, rngs={"noise": key})            # f32[B, K]
    log_lik = head.apply(params, pre_logits, labels, train=True, rngs={"noise": key})  # f32[B]

DET: p = softmax((W^T phi + b) / tau). HET: Gaussian noise on the K logits. HET-XL: Gaussian noise
on the D pre-logits, mapped through W, so its parameters do not grow with K.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.heteroscedastic import logit_distributions, mc
from models.heteroscedastic.noise import HeteroscedasticNoise, NoiseConfig
from models.heteroscedastic.sampling import Sampling
from models.heteroscedastic.temperature import Temperature, TemperatureConfig

HEAD_KINDS = ("det", "het", "hetxl")


class HeteroscedasticHead(nn.Module):
    """Classification head f32[B, D] -> log-probabilities f32[B, K] or label log-likelihoods f32[B].

    Attributes:
      num_classes: K.
      kind: "det", "het" (noise in logit space) or "hetxl" (noise in pre-logit space).
      likelihood: "softmax" (one label per example) or "sigmoid" (multi-label).
      noise: covariance parameterisation (ignored by "det").
      sampling: how many MC samples, in what chunks (ignored by "det").
      temperature: fixed or learned tau.
      prelogit_form: HET-XL's algebra, "auto" (the cheaper for the call's shapes, by the cost
        model of logit_distributions.prelogit_form), "dense" or "w_once"; results agree.

    Parameters: kernel f32[D, K], bias f32[K], noise/... (HET, HET-XL), temperature/... (learned).
    Randomness: the "noise" RNG stream, needed unless kind == "det" or deterministic=True.
    """

    num_classes: int
    kind: str = "hetxl"
    likelihood: str = "softmax"
    noise: NoiseConfig = NoiseConfig()
    temperature: TemperatureConfig = TemperatureConfig()
    sampling: Sampling = Sampling()
    prelogit_form: str = "auto"

    def chunk_for(self, batch_size: int, train: bool) -> int:
        """Samples per chunk for a (per-device) batch: each sample forms f32[batch, K] logits."""
        return self.sampling.samples_per_chunk(
            self.sampling.samples(train), batch_size * self.num_classes
        )

    def form_for(self, dim: int, batch_size: int, train: bool, deterministic: bool = False) -> str:
        """HET-XL's form ("dense" or "w_once") of a call on f32[batch_size, dim] pre-logits."""
        if self.prelogit_form != "auto":
            return self.prelogit_form
        if deterministic:
            return "dense"  # the mean only: W once would form W^T V for nothing
        num_samples = self.sampling.samples(train)
        chunks = -(-num_samples // self.chunk_for(batch_size, train))
        return logit_distributions.prelogit_form(
            num_samples, dim, self.noise.num_factors, self.noise.diag_mode, num_chunks=chunks
        )

    @nn.compact
    def __call__(
        self,
        pre_logits: jax.Array,
        labels: jax.Array | None = None,
        *,
        train: bool = False,
        deterministic: bool = False,
    ) -> jax.Array:
        """Args:
        pre_logits: phi(x), f32[B, D].
        labels: None to get log-probabilities f32[B, K]; else class ids i32[B] (softmax) or
          targets f32[B, K] (sigmoid) to get their log-likelihood f32[B].
        train: use sampling.train_samples (else sampling.eval_samples).
        deterministic: no noise, the mean logits only (DET's prediction with this head's W).
        """
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind {self.kind!r} is unknown; known: {HEAD_KINDS}")
        if self.likelihood not in mc.LIKELIHOODS:
            raise ValueError(f"likelihood {self.likelihood!r} is unknown; known: {mc.LIKELIHOODS}")
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (pre_logits.shape[-1], self.num_classes)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        tau = Temperature(self.temperature, name="temperature")()
        self.sow("intermediates", "tau", tau)  # read by trainers as a metric
        num_samples = self.sampling.samples(train)
        distribution = self._logit_distribution(pre_logits, kernel, bias, train, deterministic)
        if self.kind == "det" or deterministic:
            if labels is None:
                return mc.deterministic_log_probs(distribution, tau, self.likelihood)
            return mc.deterministic_log_likelihood(distribution, tau, labels, self.likelihood)
        sampling = dict(
            num_samples=num_samples,
            chunk_size=self.chunk_for(pre_logits.shape[0], train),
            share_across_batch=self.sampling.share_across_batch,
            likelihood=self.likelihood,
        )
        key = self.make_rng("noise")
        if labels is None:
            return mc.mc_log_probs(distribution, tau, key, **sampling)
        return mc.mc_log_likelihood(distribution, tau, labels, key, **sampling)

    def _logit_distribution(
        self,
        pre_logits: jax.Array,
        kernel: jax.Array,
        bias: jax.Array,
        train: bool,
        deterministic: bool,
    ) -> logit_distributions.Distribution:
        """The logits' distribution; HET-XL's in the form `form_for` picks for the call."""
        if self.kind == "det":
            return logit_distributions.LogitDistribution(pre_logits @ kernel + bias)
        noise_dim = self.num_classes if self.kind == "het" else pre_logits.shape[-1]
        noise = HeteroscedasticNoise(noise_dim, self.noise, name="noise")(pre_logits)
        # Read by trainers as metrics: how large the learned noise is.
        self.sow("intermediates", "noise_diag_scale", jnp.mean(noise.diag_scale))
        self.sow(
            "intermediates",
            "noise_factor_norm",
            jnp.mean(jnp.sqrt(jnp.sum(noise.factors**2, axis=(-2, -1)))),
        )
        if self.kind == "het":
            return logit_distributions.logit_noise_logits(pre_logits @ kernel + bias, noise)
        batch_size, dim = pre_logits.shape
        form = self.form_for(dim, batch_size, train, deterministic)
        return logit_distributions.prelogit_noise_logits(pre_logits, kernel, noise, bias, form=form)
