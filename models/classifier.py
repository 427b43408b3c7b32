"""Image classifier: an image tower and a DET, HET or HET-XL head (the paper's main setting).

images f32[B, H, W, 3] --tower--> pre-logits phi f32[B, D] --HeteroscedasticHead--> log p(y|x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from models.heteroscedastic import HeteroscedasticHead, NoiseConfig, Sampling, TemperatureConfig
from models.towers import build_tower


class ImageClassifier(nn.Module):
    """Attributes:
    image_tower: {"name": registered tower, **its options}; used without a projection head.
    num_classes: K.
    head: "det" | "het" | "hetxl"; likelihood: "softmax" | "sigmoid".
    noise, temperature, sampling: the head's options (see models.heteroscedastic).
    """

    image_tower: Mapping[str, Any]
    num_classes: int
    head: str = "hetxl"
    likelihood: str = "softmax"
    noise: NoiseConfig = NoiseConfig()
    temperature: TemperatureConfig = TemperatureConfig()
    sampling: Sampling = Sampling()

    def setup(self):
        options = dict(self.image_tower)
        self.img = build_tower(options.pop("name"), None, **options)
        self.classifier = HeteroscedasticHead(
            self.num_classes,
            self.head,
            self.likelihood,
            self.noise,
            self.temperature,
            self.sampling,
        )

    def __call__(
        self,
        images: jax.Array,
        labels: jax.Array | None = None,
        *,
        train: bool = False,
        deterministic: bool = False,
    ) -> jax.Array:
        """Log-probabilities f32[B, K] (labels None) or label log-likelihoods f32[B].

        labels: class ids i32[B]; a sigmoid head also takes multi-hot targets f32[B, K] (class
        ids become one-hot targets, since [B] against [B, K] would silently broadcast).
        """
        pre_logits, _ = self.img(images, train=train)
        if labels is not None and self.likelihood == "sigmoid" and labels.ndim == 1:
            labels = jax.nn.one_hot(labels, self.num_classes)
        return self.classifier(pre_logits, labels, train=train, deterministic=deterministic)
