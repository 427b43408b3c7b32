"""ViT image tower: sizes, parameter counts, a plain numpy reference forward, layouts, dtypes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import towers, vit

# (width, depth, mlp_dim, num_heads) as published in big_vision's decode_variant.
PUBLISHED_SIZES = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def expected_param_count(
    width, depth, mlp_dim, patch, num_patches, pool, posemb="learn", posemb_cls=True
):
    """Parameter count written out layer by layer, independently of the module code."""
    dense = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    layer_norm = 2 * width
    attention = 4 * dense(width, width)  # query, key, value, out
    mlp = dense(width, mlp_dim) + dense(mlp_dim, width)
    block = 2 * layer_norm + attention + mlp
    total = patch * patch * 3 * width + width  # patch embedding conv
    class_row = pool == "tok" and posemb_cls  # the class token's own position embedding
    total += (class_row + num_patches) * width if posemb == "learn" else 0
    total += width if pool == "tok" else 0
    total += depth * block + layer_norm  # blocks and encoder_norm
    if pool == "map":
        total += width + attention + layer_norm + mlp  # probe, attention, LayerNorm, MLP
    return total


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_decode_variant_matches_published_table():
    for name, (width, depth, mlp_dim, heads) in PUBLISHED_SIZES.items():
        assert vit.decode_variant(name) == dict(
            width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads
        )
    assert vit.decode_variant("L/14")["patch_size"] == (14, 14)
    assert vit.decode_variant(None) == {}
    with pytest.raises(ValueError, match="known sizes"):
        vit.decode_variant("XL/16")
    with pytest.raises(ValueError, match="patch size"):
        vit.decode_variant("B/x")


def b16_params(**kwargs):
    model = vit.Model(variant="B/16", pool_type="tok", **kwargs)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def test_vit_b16_parameter_count_is_exact():
    # Original ViT / timm / open_clip layout (the default): the class token has its own position
    # embedding, 1 + 14 * 14 = 197 rows.
    params = b16_params()
    assert count(params) == 85_798_656
    assert count(params) == expected_param_count(768, 12, 3072, 16, 196, "tok")
    assert params["pos_embedding"].shape == (1, 197, 768)


def test_vit_b16_parameter_count_in_big_vision_layout():
    # 196 position embeddings, added before the class token is prepended: 768 fewer.
    params = b16_params(posemb_cls=False)
    assert count(params) == 85_797_888
    assert count(params) == expected_param_count(768, 12, 3072, 16, 196, "tok", posemb_cls=False)
    assert params["pos_embedding"].shape == (1, 196, 768)


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_every_variant_shapes_dtypes_and_count(name):
    width, depth, mlp_dim, _ = PUBLISHED_SIZES[name]
    # Scan keeps tracing cost independent of depth; nothing is allocated under eval_shape.
    model = vit.Model(variant=f"{name}/16", pool_type="map", scan=True)
    images = jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert count(variables) == expected_param_count(width, depth, mlp_dim, 16, 6, "map")
    features, aux = jax.eval_shape(model.apply, variables, images)
    assert features.shape == (2, width) and features.dtype == jnp.float32
    assert aux["encoded_2d"].shape == (2, 2, 3, width)


# ---------------------------------------------------------------------------------------------
# Plain numpy reference of the forward pass, reading the parameters by their big_vision names.


def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # tanh approximation, flax's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(q_in, kv_in, p, key_mask=None):
    """key_mask: bool [B, S] (which keys every query may see) or [B, Q, S] (per query)."""
    q = np.einsum("bld,dhk->blhk", q_in, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", kv_in, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        per_query = key_mask[:, None, :, :] if key_mask.ndim == 3 else key_mask[:, None, None, :]
        logits = np.where(per_query, logits, -1e30)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_mlp(x, p):
    hidden = np_gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_encoder(x, p, depth, key_mask=None):
    for i in range(depth):
        b = p[f"encoderblock_{i}"]
        y = np_layer_norm(x, b["LayerNorm_0"])
        x = x + np_attention(y, y, b["MultiHeadDotProductAttention_0"], key_mask)
        x = x + np_mlp(np_layer_norm(x, b["LayerNorm_1"]), b["MlpBlock_0"])
    return np_layer_norm(x, p["encoder_norm"])


def np_map_head(x, p, key_mask=None):
    probe = np.tile(p["probe"], (x.shape[0], 1, 1))
    y = np_attention(probe, x, p["MultiHeadDotProductAttention_0"], key_mask)
    return (y + np_mlp(np_layer_norm(y, p["LayerNorm_0"]), p["MlpBlock_0"]))[:, 0]


def np_sincos_posemb(h, w, dim):
    quarter = dim // 4
    table = np.zeros((h * w, dim))
    for row in range(h):
        for col in range(w):
            for i in range(quarter):
                omega = 10_000.0 ** (-i / (quarter - 1))
                token = row * w + col
                table[token, i] = math.sin(col * omega)
                table[token, quarter + i] = math.cos(col * omega)
                table[token, 2 * quarter + i] = math.sin(row * omega)
                table[token, 3 * quarter + i] = math.cos(row * omega)
    return table[None]


def np_conv3x3_same(images, kernel, bias):
    """A 3x3 stride-1 convolution with zero padding, one output pixel at a time."""
    batch, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((batch, height, width, kernel.shape[-1]))
    for row in range(height):
        for col in range(width):
            window = padded[:, row : row + 3, col : col + 3, :]
            out[:, row, col] = np.einsum("bhwc,hwco->bo", window, kernel) + bias
    return out


def np_vit(params, images, patch, depth, pool, posemb, posemb_cls=True):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    index = 0
    while f"stem_{index}" in p:
        stem = p[f"stem_{index}"]
        images = np_gelu(np_conv3x3_same(images, stem["kernel"], stem["bias"]))
        index += 1
    batch, height, width, channels = images.shape
    gh, gw = height // patch, width // patch
    patches = images.reshape(batch, gh, patch, gw, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, gh * gw, patch * patch * channels)
    kernel = p["embedding"]["kernel"].reshape(patch * patch * channels, -1)
    x = patches @ kernel + p["embedding"]["bias"]
    table = p["pos_embedding"] if posemb == "learn" else np_sincos_posemb(gh, gw, x.shape[-1])
    if pool == "tok" and posemb == "learn" and posemb_cls:
        # Class token first, then one table row per token, row 0 for the class token.
        x = np.concatenate([np.tile(p["cls"], (batch, 1, 1)), x], axis=1)
        x = x + table
    else:
        x = x + table
        if pool == "tok":
            x = np.concatenate([np.tile(p["cls"], (batch, 1, 1)), x], axis=1)
    x = np_encoder(x, p["Transformer"], depth)
    if pool == "tok":
        return x[:, 0]
    if pool == "gap":
        return x.mean(1)
    return np_map_head(x, p["MAPHead_0"])


TINY = dict(variant="mu/4", depth=2)


def tiny_images(batch=2, size=12, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


@pytest.mark.parametrize(
    "pool, posemb, posemb_cls",
    [
        ("tok", "learn", True),
        ("tok", "learn", False),
        ("tok", "sincos2d", True),
        ("gap", "learn", True),
        ("gap", "sincos2d", True),
        ("map", "learn", True),
        ("map", "sincos2d", True),
    ],
)
def test_forward_matches_numpy_reference(pool, posemb, posemb_cls):
    model = vit.Model(**TINY, pool_type=pool, posemb=posemb, posemb_cls=posemb_cls)
    images = tiny_images()
    params = model.init(jax.random.key(1), images)["params"]
    # Random non-zero class token: the zeros init would hide a wrong cls position.
    if pool == "tok":
        params = {**params, "cls": jax.random.normal(jax.random.key(2), params["cls"].shape)}
    features, aux = model.apply({"params": params}, images)
    expected = np_vit(params, np.asarray(images, np.float64), 4, 2, pool, posemb, posemb_cls)
    assert features.shape == (2, 32) and features.dtype == jnp.float32
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=2e-5)
    assert aux["encoded"].shape == (2, 9, 32)  # class token removed
    assert ("pos_embedding" in params) == (posemb == "learn")
    if posemb == "learn":
        class_row = pool == "tok" and posemb_cls
        assert params["pos_embedding"].shape == (1, class_row + 9, 32)
    assert ("cls" in params) == (pool == "tok")
    assert ("MAPHead_0" in params) == (pool == "map")


@pytest.mark.parametrize("pool", ["gap", "map"])
def test_jax_nn_attention_matches_numpy_reference(pool):
    # attention_impl="xla": jax.nn.dot_product_attention (what "cudnn" runs on GPUs), same params.
    model = vit.Model(**TINY, pool_type=pool, attention_impl="xla")
    images = tiny_images()
    params = model.init(jax.random.key(1), images)["params"]
    features, _ = model.apply({"params": params}, images)
    expected = np_vit(params, np.asarray(images, np.float64), 4, 2, pool, "learn", True)
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=2e-5)
    flax_params = vit.Model(**TINY, pool_type=pool).init(jax.random.key(1), images)["params"]
    assert jax.tree.structure(flax_params) == jax.tree.structure(params)


def test_convolutional_stem_matches_numpy_reference():
    model = vit.Model(**TINY, pool_type="gap", stem_channels=(5, 3))
    images = tiny_images()
    params = model.init(jax.random.key(1), images)["params"]
    assert params["stem_0"]["kernel"].shape == (3, 3, 3, 5)
    assert params["stem_1"]["kernel"].shape == (3, 3, 5, 3)
    assert params["embedding"]["kernel"].shape == (4, 4, 3, 32)
    # Non-zero biases: flax initialises them to zeros, which would hide a dropped bias.
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 0.1 if "stem" in jax.tree_util.keystr(path) else leaf, params
    )
    features, _ = model.apply({"params": params}, images)
    expected = np_vit(params, np.asarray(images, np.float64), 4, 2, "gap", "learn")
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=2e-5)
    without = vit.Model(**TINY, pool_type="gap").init(jax.random.key(1), images)["params"]
    assert not any(name.startswith("stem") for name in without)  # big_vision's layout


@pytest.mark.parametrize("patch, channels", [((4, 4), 3), ((2, 3), 5)])
def test_patch_embedding_is_the_strided_convolution(patch, channels):
    """The reshape-and-matmul patch embedding computes what flax's VALID convolution with stride
    = kernel computes: same initial parameters from the same key, same outputs, same gradients
    for the kernel, the bias and the input (a stem before it needs the last)."""
    images = jax.random.normal(jax.random.key(0), (2, 8, 9, channels))
    conv = nn.Conv(7, patch, strides=patch, padding="VALID")
    ours = vit.PatchEmbedding(7, patch)
    conv_params = conv.init(jax.random.key(3), images)
    our_params = ours.init(jax.random.key(3), images)
    jax.tree.map(np.testing.assert_array_equal, our_params, conv_params)
    # A non-zero bias: the zeros init would hide a dropped one.
    params = jax.tree.map(lambda leaf: leaf + 0.3, conv_params)

    def total(module, params, images):
        return jnp.sum(jnp.sin(module.apply(params, images)))

    expected = conv.apply(params, images)
    got = ours.apply(params, images)
    assert got.shape == expected.shape == (2, 8 // patch[0], 9 // patch[1], 7)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    expected_grads = jax.grad(lambda p, x: total(conv, p, x), argnums=(0, 1))(params, images)
    got_grads = jax.grad(lambda p, x: total(ours, p, x), argnums=(0, 1))(params, images)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        got_grads,
        expected_grads,
    )


def test_class_token_posemb_row_is_the_only_difference_between_layouts():
    """A class row of zeros is big_vision's layout; any class row folds into `cls`."""
    images = tiny_images()
    model = vit.Model(**TINY, pool_type="tok")
    bv_model = vit.Model(**TINY, pool_type="tok", posemb_cls=False)
    params = model.init(jax.random.key(1), images)["params"]
    params = {**params, "cls": jax.random.normal(jax.random.key(2), (1, 1, 32))}
    table = params["pos_embedding"]
    assert not np.allclose(table[:, 0], 0)
    out, _ = model.apply({"params": params}, images)

    folded = {**params, "cls": params["cls"] + table[:, :1], "pos_embedding": table[:, 1:]}
    bv_out, _ = bv_model.apply({"params": folded}, images)
    np.testing.assert_allclose(bv_out, out, atol=1e-5, rtol=1e-5)
    # Dropping the class row without folding it changes the class token's input.
    unfolded = {**folded, "cls": params["cls"]}
    assert not np.allclose(bv_model.apply({"params": unfolded}, images)[0], out, atol=1e-3)


@pytest.mark.parametrize("pool, posemb", [("gap", "learn"), ("map", "learn"), ("tok", "sincos2d")])
def test_posemb_cls_has_no_effect_without_class_token_or_learned_table(pool, posemb):
    images = tiny_images()
    with_flag = vit.Model(**TINY, pool_type=pool, posemb=posemb, posemb_cls=True)
    without = vit.Model(**TINY, pool_type=pool, posemb=posemb, posemb_cls=False)
    params = with_flag.init(jax.random.key(1), images)["params"]
    jax.tree.map(
        np.testing.assert_array_equal, without.init(jax.random.key(1), images)["params"], params
    )
    if pool == "tok":  # a non-zero class token, so that its handling shows in the output
        params = {**params, "cls": jax.random.normal(jax.random.key(2), (1, 1, 32))}
    np.testing.assert_array_equal(
        with_flag.apply({"params": params}, images)[0], without.apply({"params": params}, images)[0]
    )


def test_head_projects_and_is_zero_initialised():
    model = vit.Model(7, **TINY, pool_type="gap")
    images = tiny_images()
    variables = model.init(jax.random.key(0), images)
    features, aux = model.apply(variables, images)
    assert features.shape == (2, 7)
    np.testing.assert_array_equal(
        features, np.broadcast_to(variables["params"]["head"]["bias"], (2, 7))
    )
    kernel = jax.random.normal(jax.random.key(3), (32, 7))
    params = {**variables["params"], "head": {"kernel": kernel, "bias": jnp.zeros(7)}}
    projected, _ = model.apply({"params": params}, images)
    np.testing.assert_allclose(projected, aux["pre_logits"] @ kernel, atol=1e-5)


@pytest.mark.parametrize("pool", ["tok", "map"])
def test_scan_and_python_loop_agree(pool):
    images = tiny_images()
    loop_model = vit.Model(**TINY, pool_type=pool)
    scan_model = vit.Model(**TINY, pool_type=pool, scan=True)
    loop_params = loop_model.init(jax.random.key(0), images)["params"]
    scan_params = vit.pyloop_to_scan(loop_params)
    kernel = scan_params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.shape == (2, 32, 128)
    # The converted tree has exactly the structure the scan model initialises.
    scan_init = jax.eval_shape(scan_model.init, jax.random.key(0), images)["params"]
    assert jax.tree.structure(scan_init) == jax.tree.structure(scan_params)
    loop_out, _ = loop_model.apply({"params": loop_params}, images)
    scan_out, _ = scan_model.apply({"params": scan_params}, images)
    np.testing.assert_allclose(scan_out, loop_out, atol=1e-5, rtol=1e-5)
    back = vit.scan_to_pyloop(scan_params)
    jax.tree.map(np.testing.assert_array_equal, back, loop_params)


def test_scan_gradients_match_python_loop():
    images = tiny_images()
    loop_model = vit.Model(**TINY, pool_type="gap")
    scan_model = vit.Model(**TINY, pool_type="gap", scan=True, remat_policy="nothing_saveable")
    params = loop_model.init(jax.random.key(0), images)["params"]

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, images)[0] ** 2)

    loop_grads = jax.grad(lambda p: loss(loop_model, p))(params)
    scan_grads = jax.grad(lambda p: loss(scan_model, p))(vit.pyloop_to_scan(params))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
        vit.scan_to_pyloop(scan_grads),
        loop_grads,
    )


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_bfloat16_matmuls_with_float32_params_and_output():
    images = tiny_images()
    model_f32 = vit.Model(**TINY, pool_type="map")
    model_bf16 = vit.Model(**TINY, pool_type="map", dtype_mm="bfloat16")
    variables = model_f32.init(jax.random.key(0), images)
    bf16_init = model_bf16.init(jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16_init)} == {jnp.dtype(jnp.float32)}

    jaxpr = jax.make_jaxpr(lambda v, x: model_bf16.apply(v, x)[0])(variables, images)
    contractions = [
        e
        for e in _all_eqns(jaxpr.jaxpr)
        if e.primitive.name in ("dot_general", "conv_general_dilated")
    ]
    assert len(contractions) > 10
    for eqn in contractions:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn

    out_f32, _ = model_f32.apply(variables, images)
    out_bf16, _ = model_bf16.apply(variables, images)
    assert out_bf16.dtype == jnp.float32
    np.testing.assert_allclose(out_bf16, out_f32, atol=0.1, rtol=0.1)
    assert not np.array_equal(out_bf16, out_f32)


def test_dropout_only_in_training():
    images = tiny_images()
    model = vit.Model(**TINY, pool_type="gap", dropout=0.5)
    variables = model.init(jax.random.key(0), images)
    eval_a, _ = model.apply(variables, images)
    no_dropout, _ = vit.Model(**TINY, pool_type="gap").apply(variables, images)
    np.testing.assert_array_equal(eval_a, no_dropout)
    train_1, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
    train_2, _ = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_1, eval_a) and not np.allclose(train_1, train_2)


def test_invalid_configurations_fail_clearly():
    images = tiny_images(size=10)  # not a multiple of the patch size 4
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        vit.Model(**TINY).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="pool_type"):
        vit.Model(**TINY, pool_type="cls").init(jax.random.key(0), tiny_images())
    with pytest.raises(ValueError, match="posemb"):
        vit.Model(**TINY, posemb="rope").init(jax.random.key(0), tiny_images())
    with pytest.raises(ValueError, match="cudnn' needs bfloat16 .* run in float32"):
        vit.Model(**TINY, attention_impl="cudnn").init(jax.random.key(0), tiny_images())
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="only on NVIDIA GPUs.*use attention_impl='flax'"):
            vit.Model(**TINY, attention_impl="cudnn", dtype_mm="bfloat16").init(
                jax.random.key(0), tiny_images()
            )


def test_tower_registry():
    assert set(towers.TOWERS) == {"vit", "text_transformer", "bert_minilm"}
    tower = towers.build_tower("vit", 5, variant="mu/4", depth=1)
    assert isinstance(tower, vit.ViT) and tower.num_classes == 5 and tower.width == 32
    with pytest.raises(KeyError, match="known towers: \\['bert_minilm', 'text_transformer', 'vit'"):
        towers.get_tower("resnet")
