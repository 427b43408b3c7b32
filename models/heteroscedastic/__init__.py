"""Heteroscedastic classifiers: DET, HET and HET-XL heads and their Monte-Carlo machinery.

Public API:
  HeteroscedasticHead                  the classification head (kind "det" | "het" | "hetxl").
  NoiseConfig, HeteroscedasticNoise    covariance parameterisation.
  Sampling                             MC samples, chunk size, shared draws (heads, loss, evals).
  NoiseParameters                      V(x), d(x) and the mean shift of one batch.
  TemperatureConfig, Temperature       fixed, bounded, bounded-in-log-space or CLIP log-scale tau.
  prelogit_noise_logits                HET-XL noise + ANY class matrix -> LogitDistribution (the
                                       "W once" form) or PrelogitDistribution (the dense form),
                                       whichever prelogit_form finds cheaper for S samples.
  logit_noise_logits                   HET noise on given logits -> LogitDistribution.
  mc_log_probs, mc_log_likelihood      MC-averaged predictions / label log-likelihoods.
  sample_prelogit_noise                dense pre-logit noise samples (for the contrastive loss).
  log_mean_exp_over_samples            the chunked, memory-flat MC reduction they are built on.
"""

from models.heteroscedastic.heads import HEAD_KINDS, HeteroscedasticHead
from models.heteroscedastic.logit_distributions import (
    PRELOGIT_FORMS,
    LogitDistribution,
    PrelogitDistribution,
    logit_noise_logits,
    prelogit_form,
    prelogit_form_costs,
    prelogit_noise_logits,
    sample_logits,
    sample_prelogit_noise,
    standard_normal_draws,
)
from models.heteroscedastic.mc import (
    LIKELIHOODS,
    deterministic_log_likelihood,
    deterministic_log_probs,
    log_mean_exp_over_samples,
    mc_log_likelihood,
    mc_log_probs,
)
from models.heteroscedastic.noise import (
    DIAG_MODES,
    HeteroscedasticNoise,
    NoiseConfig,
    NoiseParameters,
)
from models.heteroscedastic.sampling import Sampling
from models.heteroscedastic.temperature import (
    TEMPERATURE_MODES,
    Temperature,
    TemperatureConfig,
    bounded_log_tau,
    bounded_tau,
)

__all__ = [
    "DIAG_MODES",
    "HEAD_KINDS",
    "LIKELIHOODS",
    "PRELOGIT_FORMS",
    "TEMPERATURE_MODES",
    "HeteroscedasticHead",
    "HeteroscedasticNoise",
    "LogitDistribution",
    "NoiseConfig",
    "NoiseParameters",
    "PrelogitDistribution",
    "Sampling",
    "Temperature",
    "TemperatureConfig",
    "bounded_log_tau",
    "bounded_tau",
    "deterministic_log_likelihood",
    "deterministic_log_probs",
    "log_mean_exp_over_samples",
    "logit_noise_logits",
    "mc_log_likelihood",
    "mc_log_probs",
    "prelogit_form",
    "prelogit_form_costs",
    "prelogit_noise_logits",
    "sample_logits",
    "sample_prelogit_noise",
    "standard_normal_draws",
]
