"""Transformer text tower (CLIP/LiT style), sized with the same variants as the ViT.

Parameter names follow big_vision's `proj/image_text/text_transformer.py`:

    Embed_0/embedding           [vocab_size, D] token embedding
    pos_embedding               [1, max_len, D] learned position embedding
    Encoder_0/...               the ViT encoder (`models.vit.Encoder`), python-loop or scan layout
    MAPHead_0/...               attention pooling ("map" pooling) only
    head/{kernel,bias}          optional projection to `num_classes` outputs

Token id 0 is padding. Padding is excluded everywhere it could leak into the result: real tokens
never attend to pad keys, and every pooling ignores pad positions. Sequences may be shorter than
`max_len` (the first L position embeddings are used); padding may sit anywhere, though right
padding is the usual layout.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import vit

POOL_TYPES = ("last", "first", "mean", "max", "map")
PAD_ID = 0


class TextTransformer(nn.Module):
    """Text encoder. tokens i32[B, L] (0 = pad, L <= max_len) -> (features, aux).

    features: [B, D], or [B, num_classes] with a head. aux["encoded"]: [B, L, D] token outputs.
    Pooling: "last" = last non-pad token (the EOS of a right-padded sequence), "first" = token 0,
    "mean"/"max" = over non-pad tokens, "map" = attention pooling over non-pad tokens.
    A row with no real tokens pools to zeros (mean, max) rather than NaN.
    With `causal=True` token i attends only to tokens <= i (GPT/CLIP text encoder).
    """

    vocab_size: int
    num_classes: int | None = None
    max_len: int = 64
    width: int = 512
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 8
    dropout: float = 0.0
    pool_type: str = "last"
    causal: bool = False
    head_zeroinit: bool = True
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"
    attention_impl: str = "flax"

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"Text length {length} exceeds max_len {self.max_len}")
        is_token = tokens != PAD_ID  # [B, L]

        x = nn.Embed(num_embeddings=self.vocab_size, features=self.width, name="Embed_0")(tokens)
        posemb = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
            (1, self.max_len, self.width),
            jnp.float32,
        )
        x = x + posemb[:, :length]
        x = nn.Dropout(rate=self.dropout)(x, not train)

        # Mask keys only: a pad *query* row still attends to the real tokens, which keeps its
        # softmax well defined, and pad rows are dropped by the pooling anyway.
        mask = jnp.broadcast_to(is_token[:, None, None, :], (batch, 1, length, length))
        if self.causal:
            mask = mask & nn.make_causal_mask(tokens, dtype=jnp.bool_)
        x = vit.Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            scan=self.scan,
            remat_policy=self.remat_policy,
            dtype_mm=self.dtype_mm,
            attention_impl=self.attention_impl,
            name="Encoder_0",
        )(x, mask, deterministic=not train)
        aux: dict[str, jax.Array] = {"encoded": x}

        if self.pool_type == "map":
            pooled = vit.MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype_mm=self.dtype_mm,
                attention_impl=self.attention_impl,
            )(x, is_token)
        else:
            pooled = _pool(x, is_token, self.pool_type)
        aux["pre_logits"] = pooled

        if self.num_classes:
            init = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            pooled = nn.Dense(self.num_classes, name="head", **init)(pooled)
        return pooled, aux


def _pool(x: jax.Array, is_token: jax.Array, pool_type: str) -> jax.Array:
    """Parameter-free pooling of [B, L, D] tokens with a bool [B, L] validity mask -> [B, D]."""
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        positions = jnp.arange(x.shape[1])
        # Highest position holding a real token (0 for an all-pad row).
        last = jnp.max(jnp.where(is_token, positions[None, :], 0), axis=1)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    weights = is_token[..., None]
    count = jnp.sum(is_token, axis=1)[:, None]
    if pool_type == "mean":
        return jnp.sum(jnp.where(weights, x, 0.0), axis=1) / jnp.maximum(count, 1)
    if pool_type == "max":
        maxed = jnp.max(jnp.where(weights, x, -jnp.inf), axis=1)
        return jnp.where(count > 0, maxed, 0.0)
    raise ValueError(f"Unknown pool_type {pool_type!r}")


def Model(  # noqa: N802
    num_classes: int | None = None, *, vocab_size: int, variant: str | None = None, **kwargs: Any
) -> TextTransformer:
    """Builds a `TextTransformer` from a size name ("B", no "/patch") plus field overrides."""
    sizes = vit.decode_variant(variant)
    if "patch_size" in sizes:
        raise ValueError(f"Text variant {variant!r} must not carry a patch size")
    return TextTransformer(vocab_size=vocab_size, num_classes=num_classes, **{**sizes, **kwargs})
