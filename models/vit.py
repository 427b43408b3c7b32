"""Vision Transformer image tower, with big_vision's parameter names.

Module and parameter names follow google-research/big_vision's `models/vit.py` so that its `.npz`
checkpoints load by name (see `models/pretrained.py`):

    stem_{i}/{kernel,bias}               optional 3x3 convolutions before the patch embedding
    embedding/{kernel,bias}              patch embedding, a [P, P, C, D] strided convolution
                                         (computed as one matmul: PatchEmbedding)
    pos_embedding                        [1, 1 + N, D] or [1, N, D] (see below), "learn" only
    cls                                  [1, 1, D], class token ("tok" pooling) only
    Transformer/encoderblock_{i}/...     one block per layer (python loop), or
    Transformer/encoderblock/...         all layers stacked on a leading axis (`scan=True`)
    Transformer/encoder_norm             final LayerNorm
    MAPHead_0/...                        attention pooling ("map" pooling) only
    head/{kernel,bias}                   optional projection to `num_classes` outputs

With "tok" pooling and a learned table, the class token is prepended first and has its own
position embedding (row 0), as in the original ViT, timm and open_clip: a B/16 at 224 px has
1 + 14 * 14 = 197 position embeddings and 85,798,656 parameters before any head. `posemb_cls=False`
gives big_vision's layout instead: the table is added to the N patch tokens before the class token
is prepended (196 rows, 85,797,888 parameters). Both layouts express the same networks: a class
row can be folded into `cls`, and big_vision's layout is a class row of zeros;
`models/pretrained.py` converts checkpoints between them. Without a class token ("gap", "map") or
with the fixed "sincos2d" table, the table has N rows either way.

Towers return `(features, aux)`: `features` is [B, D] (or [B, num_classes] with a head) and `aux`
holds intermediate tensors, e.g. `aux["encoded"]` is the [B, N, D] patch-token sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POOL_TYPES = ("tok", "gap", "map")
POSEMB_TYPES = ("learn", "sincos2d")
# "flax": flax's einsum attention (the default; what big_vision runs). "xla" / "cudnn": the same
# attention through jax.nn.dot_product_attention with that implementation; "cudnn" is cuDNN's fused
# (flash) kernel, NVIDIA GPUs only, bf16/fp16 matmuls and head sizes it supports (a one-token
# query runs XLA's version).
ATTENTION_IMPLS = ("flax", "xla", "cudnn")


def attention_function(impl: str):
    """The `attention_fn` of nn.MultiHeadDotProductAttention for `impl` (one of ATTENTION_IMPLS).

    Both take q, k, v as [B, L, heads, head_dim] and a bool mask broadcastable to
    [B, heads, Lq, Lk], so the parameters and the result are the same whichever runs.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    if impl == "flax":
        return nn.dot_product_attention

    def attention(query, key, value, mask=None):
        implementation = impl
        if impl == "cudnn" and query.shape[1] == 1:
            # cuDNN's kernel refuses a query of length 1 ("Unsupported sequence length Q 1"), as
            # in the MAP head's probe: a sliver of the model, which XLA's version runs.
            implementation = "xla"
        if implementation == "cudnn":
            _check_cudnn_attention(query.dtype)
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask, implementation=implementation
        )

    return attention


def _check_cudnn_attention(dtype) -> None:
    """Refuses, while the model is traced (config checks trace it), what cuDNN's kernel would
    refuse later inside XLA's compile."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention_impl='cudnn' needs bfloat16 or float16 matmuls, but they run in {dtype}: "
            "set the tower's dtype_mm='bfloat16', or use attention_impl='flax'"
        )
    if jax.default_backend() != "gpu":
        raise ValueError(
            "attention_impl='cudnn' runs only on NVIDIA GPUs, but JAX's backend here is "
            f"{jax.default_backend()!r}: use attention_impl='flax' (or 'xla')"
        )


@dataclasses.dataclass(frozen=True)
class Variant:
    """Size of a transformer: residual width, number of blocks, MLP hidden size, attention heads."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int


# Sizes from big_vision's `decode_variant` (Table 2 of arXiv:2106.04560, plus "mu" for smoke tests
# and So400m from arXiv:2305.13035). Shared by the image and text towers.
VARIANTS: Mapping[str, Variant] = {
    "mu": Variant(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": Variant(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": Variant(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": Variant(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": Variant(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": Variant(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": Variant(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": Variant(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": Variant(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": Variant(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "e": Variant(width=1792, depth=56, mlp_dim=15360, num_heads=16),
}


def decode_variant(variant: str | None) -> dict[str, Any]:
    """Turns "B" or "B/16" into width, depth, mlp_dim, num_heads (and patch_size) arguments.

    `None` gives `{}` so that explicit keyword arguments alone define the model.
    """
    if variant is None:
        return {}
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; known sizes: {sorted(VARIANTS)}")
    kwargs: dict[str, Any] = dataclasses.asdict(VARIANTS[name])
    if patch:
        if not patch.isdigit() or int(patch) <= 0:
            raise ValueError(f"Bad patch size in variant {variant!r}; expected e.g. 'B/16'")
        kwargs["patch_size"] = (int(patch), int(patch))
    return kwargs


def posemb_sincos_2d(
    height: int, width: int, dim: int, temperature: float = 10_000.0, dtype: Any = jnp.float32
) -> jax.Array:
    """Fixed 2D sine-cosine position embedding (MoCo v3 layout): [1, height * width, dim].

    A quarter of the channels each hold sin(x), cos(x), sin(y), cos(y) at geometrically spaced
    frequencies; tokens are in row-major (y, x) order, matching the patch flattening.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {dim}")
    ys, xs = np.mgrid[:height, :width]
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
    angle_y = ys.reshape(-1)[:, None] * omega[None, :]
    angle_x = xs.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate(
        [np.sin(angle_x), np.cos(angle_x), np.sin(angle_y), np.cos(angle_y)], axis=1
    )
    return jnp.asarray(table[None], dtype)


class MlpBlock(nn.Module):
    """Transformer feed-forward block: Dense(mlp_dim) -> GELU -> dropout -> Dense(D). [B, L, D]."""

    mlp_dim: int | None = None  # None: 4 * D
    dropout: float = 0.0
    dtype_mm: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim or 4 * width, dtype=self.dtype_mm, **inits)(x)
        x = nn.gelu(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(width, dtype=self.dtype_mm, **inits)(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)). [B, L, D] -> [B, L, D].

    `mask` is a boolean attention mask broadcastable to [B, heads, L, L] (True = may attend).
    """

    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0
    dtype_mm: str = "float32"
    attention_impl: str = "flax"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic,
            dtype=self.dtype_mm,
            attention_fn=attention_function(self.attention_impl),
        )(y, y, mask=mask)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = x + y
        y = nn.LayerNorm()(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm)(
            y, deterministic
        )
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        return x + y


class _StepBlock(Encoder1DBlock):
    """`Encoder1DBlock` returning (carry, None), the step signature `nn.scan` expects."""

    @nn.compact
    def __call__(  # type: ignore[override]
        self, x: jax.Array, mask: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, None]:
        return super().__call__(x, mask, deterministic), None


class Encoder(nn.Module):
    """Stack of `depth` transformer blocks and a final LayerNorm. [B, L, D] -> [B, L, D].

    With `scan=True` the blocks run under `nn.scan` with rematerialisation (`remat_policy` names a
    `jax.checkpoint_policies` member), storing parameters stacked as `encoderblock/...` with a
    leading [depth] axis; compile time then no longer grows with depth. Use `pyloop_to_scan` /
    `scan_to_pyloop` to move weights between the two layouts.
    """

    depth: int
    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"
    attention_impl: str = "flax"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        block_kwargs = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            dtype_mm=self.dtype_mm,
            attention_impl=self.attention_impl,
        )
        if self.scan:
            if not hasattr(jax.checkpoint_policies, self.remat_policy):
                raise ValueError(f"Unknown remat_policy {self.remat_policy!r}")
            remat_block = nn.remat(
                _StepBlock,
                prevent_cse=False,  # scan already prevents the CSE that remat guards against
                static_argnums=(3,),  # 0=self, 1=x, 2=mask, 3=deterministic
                policy=getattr(jax.checkpoint_policies, self.remat_policy),
            )
            x, _ = nn.scan(
                remat_block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
            )(name="encoderblock", **block_kwargs)(x, mask, deterministic)
        else:
            for layer in range(self.depth):
                x = Encoder1DBlock(name=f"encoderblock_{layer}", **block_kwargs)(
                    x, mask, deterministic
                )
        return nn.LayerNorm(name="encoder_norm")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens. [B, L, D] -> [B, D].

    `mask` (bool [B, L], True = real token) keeps padding out of the pooled summary.
    """

    mlp_dim: int | None = None
    num_heads: int = 12
    dtype_mm: str = "float32"
    attention_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        batch, _, width = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
        probe = jnp.tile(probe, [batch, 1, 1])
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype_mm,
            attention_fn=attention_function(self.attention_impl),
        )(probe, x, mask=attn_mask)
        # Back to the float32 activation dtype; only the matmuls run in dtype_mm.
        x = x.astype(jnp.float32)
        y = nn.LayerNorm()(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype_mm=self.dtype_mm)(y)
        return x[:, 0]


class PatchEmbedding(nn.Module):
    """Non-overlapping P x P patches projected to `features`: what a VALID convolution with stride P
    computes, with the same `kernel` [P, P, C, D] and `bias` [D] (so checkpoints of either load),
    done as a reshape and one matmul.

    Why not nn.Conv: on CPU, XLA runs the convolution's input gradient (needed when a stem sits
    before the patches) as a base-dilated convolution, ~35 ms of a ~450 ms demo step; in the
    matmul form the whole patch embedding, forward and backward, costs a few ms
    (configs/demo.py's step: 409 -> 372 ms, median of 10 alternating calls).
    """

    features: int
    patch_size: Sequence[int]
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        patch_h, patch_w = self.patch_size
        batch, height, width, channels = x.shape
        grid_h, grid_w = height // patch_h, width // patch_w
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),  # fan-in P * P * C, as nn.Conv's default
            (patch_h, patch_w, channels, self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        # Rows and columns past the last whole patch are dropped, as a VALID convolution drops
        # them (ViT refuses such sizes before it gets here).
        x = jnp.asarray(x[:, : grid_h * patch_h, : grid_w * patch_w], self.dtype)
        # [B, H, W, C] -> [B, gh, gw, P, P, C]: each patch's pixels in the kernel's (row, col, C)
        # order, so the flattened kernel lines up with them.
        patches = x.reshape(batch, grid_h, patch_h, grid_w, patch_w, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h, grid_w, patch_h * patch_w * channels)
        flat_kernel = jnp.asarray(kernel, self.dtype).reshape(-1, self.features)
        return patches @ flat_kernel + jnp.asarray(bias, self.dtype)


class ViT(nn.Module):
    """Vision Transformer. images f32[B, H, W, C] -> (features [B, D or num_classes], aux).

    H and W must be multiples of the patch size. Matmuls and convolutions run in `dtype_mm`
    (e.g. "bfloat16"); parameters, LayerNorms and the residual stream stay float32.

    `posemb_cls` (True: original ViT layout, False: big_vision's) decides whether the class token
    has its own row in the learned position table, [1, 1 + N, D] vs [1, N, D]. It only matters
    with `pool_type="tok"` and `posemb="learn"`; otherwise there is no class token or no learned
    table, and the flag has no effect.

    `stem_channels` (default none) puts 3x3 stride-1 convolutions with GELU before the patch
    embedding, one per entry: each token then sees edges and strokes rather than a linear mix of
    raw pixels, at the same token count (the "convolutional stem" of arXiv:2106.14881, here at
    full resolution for small images). big_vision's checkpoints have none.
    """

    num_classes: int | None = None
    patch_size: Sequence[int] = (16, 16)
    stem_channels: Sequence[int] = ()
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    posemb: str = "learn"
    posemb_cls: bool = True
    dropout: float = 0.0
    pool_type: str = "gap"
    head_zeroinit: bool = True
    scan: bool = False
    remat_policy: str = "nothing_saveable"
    dtype_mm: str = "float32"
    attention_impl: str = "flax"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"Unknown posemb {self.posemb!r}; expected one of {POSEMB_TYPES}")
        patch_h, patch_w = self.patch_size
        if images.shape[1] % patch_h or images.shape[2] % patch_w:
            # A VALID convolution would silently drop the border pixels.
            raise ValueError(
                f"Image size {images.shape[1:3]} is not a multiple of patch size {self.patch_size}"
            )
        aux: dict[str, jax.Array] = {}

        x = jnp.asarray(images, self.dtype_mm)
        for index, channels in enumerate(self.stem_channels):
            x = nn.Conv(
                channels, (3, 3), padding="SAME", name=f"stem_{index}", dtype=self.dtype_mm
            )(x)
            x = nn.gelu(x)
        x = PatchEmbedding(
            self.width, tuple(self.patch_size), name="embedding", dtype=self.dtype_mm
        )(x)
        batch, grid_h, grid_w, width = x.shape
        x = jnp.reshape(x, [batch, grid_h * grid_w, width])

        class_rows = int(self.pool_type == "tok" and self.posemb == "learn" and self.posemb_cls)
        if self.posemb == "learn":
            posemb = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=1 / np.sqrt(width)),
                (1, class_rows + grid_h * grid_w, width),
                jnp.float32,
            )
        else:
            posemb = posemb_sincos_2d(grid_h, grid_w, width)

        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, width), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls, [batch, 1, 1]), x], axis=1)
            if not class_rows:
                # big_vision layout: the class token gets no position embedding.
                posemb = jnp.pad(posemb, ((0, 0), (1, 0), (0, 0)))
        # Adding a float32 table promotes the residual stream to float32 under bfloat16 matmuls.
        x = x + posemb

        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            scan=self.scan,
            remat_policy=self.remat_policy,
            dtype_mm=self.dtype_mm,
            attention_impl=self.attention_impl,
            name="Transformer",
        )(x, deterministic=not train)

        if self.pool_type == "tok":
            pooled, encoded = x[:, 0], x[:, 1:]
        elif self.pool_type == "gap":
            pooled, encoded = jnp.mean(x, axis=1), x
        else:
            pooled = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype_mm=self.dtype_mm,
                attention_impl=self.attention_impl,
            )(x)
            encoded = x
        aux["encoded"] = encoded
        aux["encoded_2d"] = jnp.reshape(encoded, [batch, grid_h, grid_w, width])
        aux["pre_logits"] = pooled

        if self.num_classes:
            init = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            pooled = nn.Dense(self.num_classes, name="head", **init)(pooled)
        return pooled, aux


def Model(num_classes: int | None = None, *, variant: str | None = None, **kwargs: Any) -> ViT:  # noqa: N802
    """Builds a `ViT` from a variant string ("B/16") plus overrides (any `ViT` field)."""
    return ViT(num_classes=num_classes, **{**decode_variant(variant), **kwargs})


def pyloop_to_scan(params: Mapping[str, Any], encoder_name: str = "Transformer") -> dict:
    """Stacks `encoderblock_{i}` subtrees into one `encoderblock` tree with a leading [depth] axis.

    Works on any tree that holds an `Encoder` under `encoder_name` (ViT: "Transformer", text
    tower: "Encoder_0"). Returns a new tree; the input is not modified.
    """
    params = jax.tree.map(lambda leaf: leaf, dict(params))  # structural copy
    encoder = dict(params[encoder_name])
    layers = sorted(
        int(key.rsplit("_", 1)[1]) for key in encoder if key.startswith("encoderblock_")
    )
    if not layers:
        raise ValueError(f"No encoderblock_{{i}} entries under {encoder_name!r}")
    if layers != list(range(len(layers))):
        raise ValueError(f"Encoder blocks are not numbered 0..{len(layers) - 1}: {layers}")
    blocks = [encoder.pop(f"encoderblock_{i}") for i in layers]
    encoder["encoderblock"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    params[encoder_name] = encoder
    return params


def scan_to_pyloop(params: Mapping[str, Any], encoder_name: str = "Transformer") -> dict:
    """Inverse of `pyloop_to_scan`: splits the stacked `encoderblock` into `encoderblock_{i}`."""
    params = jax.tree.map(lambda leaf: leaf, dict(params))
    encoder = dict(params[encoder_name])
    if "encoderblock" not in encoder:
        raise ValueError(f"No stacked 'encoderblock' under {encoder_name!r}")
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        encoder[f"encoderblock_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    params[encoder_name] = encoder
    return params
