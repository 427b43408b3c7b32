"""BERT-style text tower; the defaults are sentence-transformers/all-MiniLM-L6-v2.

Post-LN BERT encoder (LayerNorm after each residual add), exact-erf GELU, learned absolute
position embeddings, token-type embeddings, and mean pooling over non-pad tokens, as in the
sentence-transformers pipeline (without its final L2 normalisation, which the two-tower model
applies to every embedding anyway). `models.pretrained.load_minilm_params` fills the parameters
from the released weights. Parameter tree:

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    layer_{i}/attention/{query,key,value,out}/{kernel,bias}   (flax multi-head layout)
    layer_{i}/attention_norm, layer_{i}/intermediate, layer_{i}/output, layer_{i}/output_norm
    head/{kernel,bias}                                          optional projection
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import vit

PAD_ID = 0


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm. i32[B, L] -> [B, L, D]."""

    vocab_size: int
    width: int
    max_len: int
    type_vocab_size: int
    layer_norm_eps: float

    @nn.compact
    def __call__(self, tokens: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = nn.Embed(self.vocab_size, self.width, name="word_embeddings")(tokens)
        x = x + nn.Embed(self.max_len, self.width, name="position_embeddings")(positions)
        x = x + nn.Embed(self.type_vocab_size, self.width, name="token_type_embeddings")(
            token_type_ids
        )
        return _layer_norm(self.layer_norm_eps, "LayerNorm")(x)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + MHSA(x)); x = LN(x + FFN(x)). [B, L, D] -> [B, L, D]."""

    num_heads: int
    mlp_dim: int
    dropout: float
    layer_norm_eps: float
    dtype_mm: str
    attention_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dropout_rate=self.dropout,
            deterministic=deterministic,
            dtype=self.dtype_mm,
            attention_fn=vit.attention_function(self.attention_impl),
            name="attention",
        )(x, x, mask=mask)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = _layer_norm(self.layer_norm_eps, "attention_norm")(x + y)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype_mm, name="intermediate")(x)
        y = nn.gelu(y, approximate=False)  # BERT's "gelu" is the exact erf form
        y = nn.Dense(x.shape[-1], dtype=self.dtype_mm, name="output")(y)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        return _layer_norm(self.layer_norm_eps, "output_norm")(x + y)


class BertTextEncoder(nn.Module):
    """BERT encoder with mean pooling. tokens i32[B, L] (0 = pad) -> (features, aux).

    features: [B, width] mean of the final token states over non-pad tokens, or
    [B, num_classes] with a head. aux["encoded"]: [B, L, width]. `attention_mask` ([B, L], nonzero
    = real token) overrides the `tokens != 0` default; `token_type_ids` default to 0.
    """

    vocab_size: int = 30522
    num_classes: int | None = None
    width: int = 384
    depth: int = 6
    num_heads: int = 12
    mlp_dim: int = 1536
    max_len: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    head_zeroinit: bool = True
    dtype_mm: str = "float32"
    attention_impl: str = "flax"  # see vit.ATTENTION_IMPLS

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, dict]:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"Text length {tokens.shape[1]} exceeds max_len {self.max_len}")
        if self.dropout and self.attention_impl != "flax":
            # jax.nn.dot_product_attention has no dropout of the attention weights.
            raise ValueError(
                f"dropout={self.dropout} needs attention_impl='flax' (BERT drops attention "
                f"weights; attention_impl={self.attention_impl!r} cannot)"
            )
        is_token = (tokens != PAD_ID) if attention_mask is None else (attention_mask != 0)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)

        x = BertEmbeddings(
            vocab_size=self.vocab_size,
            width=self.width,
            max_len=self.max_len,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            name="embeddings",
        )(tokens, token_type_ids)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        key_mask = is_token[:, None, None, :]  # [B, 1, 1, L]: nobody attends to padding
        for layer in range(self.depth):
            x = BertLayer(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                layer_norm_eps=self.layer_norm_eps,
                dtype_mm=self.dtype_mm,
                attention_impl=self.attention_impl,
                name=f"layer_{layer}",
            )(x, key_mask, not train)
        aux: dict[str, jax.Array] = {"encoded": x}

        weights = is_token[..., None].astype(x.dtype)
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        aux["pre_logits"] = pooled
        if self.num_classes:
            init = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            pooled = nn.Dense(self.num_classes, name="head", **init)(pooled)
        return pooled, aux


def _layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    # The two-pass variance matches PyTorch's LayerNorm to float32 rounding; the one-pass
    # E[x^2] - E[x]^2 form loses digits when |mean| >> std.
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


def Model(num_classes: int | None = None, **kwargs: Any) -> BertTextEncoder:  # noqa: N802
    """Builds a `BertTextEncoder`; without overrides it has the all-MiniLM-L6-v2 shape."""
    return BertTextEncoder(num_classes=num_classes, **kwargs)
