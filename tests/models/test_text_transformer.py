"""Text tower: sizes, pooling over non-pad tokens, padding invariance, causal masking, layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import text_transformer, vit

VOCAB = 50
TINY = dict(vocab_size=VOCAB, variant="mu", depth=2, max_len=16)
POOLS = ["last", "first", "mean", "max", "map"]

# Right-padded rows of different lengths (0 = pad), including one full-length row.
TOKENS = np.array(
    [
        [5, 9, 3, 7, 0, 0, 0, 0],
        [4, 0, 0, 0, 0, 0, 0, 0],
        [8, 2, 6, 1, 9, 4, 3, 11],
    ],
    dtype=np.int32,
)
LENGTHS = [4, 1, 8]


def apply(model, params, tokens, **kwargs):
    return model.apply({"params": params}, jnp.asarray(tokens), **kwargs)


def init(model, tokens=TOKENS, seed=0):
    return model.init(jax.random.key(seed), jnp.asarray(tokens))["params"]


@pytest.mark.parametrize("name", sorted(vit.VARIANTS))
def test_every_variant_shape_and_dtype(name):
    sizes = vit.VARIANTS[name]
    model = text_transformer.Model(
        vocab_size=1000, variant=name, max_len=16, pool_type="map", scan=True
    )
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params = variables["params"]
    assert params["Embed_0"]["embedding"].shape == (1000, sizes.width)
    assert params["pos_embedding"].shape == (1, 16, sizes.width)
    mlp = params["Encoder_0"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert mlp.shape == (sizes.depth, sizes.width, sizes.mlp_dim)
    features, aux = jax.eval_shape(model.apply, variables, tokens)
    assert features.shape == (2, sizes.width) and features.dtype == jnp.float32
    assert aux["encoded"].shape == (2, 16, sizes.width)


def reference_pool(encoded, tokens, pool):
    """Row-by-row pooling over the real tokens only."""
    rows = []
    for row, ids in zip(np.asarray(encoded), tokens, strict=True):
        real = row[ids != 0]
        rows.append(
            {"first": row[0], "last": real[-1], "mean": real.mean(0), "max": real.max(0)}[pool]
        )
    return np.stack(rows)


@pytest.mark.parametrize("pool", POOLS[:4])
def test_parameter_free_pooling_uses_real_tokens_only(pool):
    model = text_transformer.Model(**TINY, pool_type=pool)
    params = init(model)
    features, aux = apply(model, params, TOKENS)
    assert features.shape == (3, 32) and features.dtype == jnp.float32
    np.testing.assert_allclose(features, reference_pool(aux["encoded"], TOKENS, pool), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", POOLS)
def test_padding_does_not_change_features(pool, causal):
    """Each row alone and unpadded gives the same features as inside a padded batch."""
    model = text_transformer.Model(**TINY, pool_type=pool, causal=causal)
    params = init(model)
    padded, _ = apply(model, params, TOKENS)
    longer, _ = apply(model, params, np.pad(TOKENS, ((0, 0), (0, 5))))
    np.testing.assert_allclose(longer, padded, atol=1e-5)
    for i, length in enumerate(LENGTHS):
        alone, _ = apply(model, params, TOKENS[i : i + 1, :length])
        np.testing.assert_allclose(padded[i], alone[0], atol=1e-5)


def np_text_transformer(params, tokens, depth, pool, causal):
    """The text tower in float64 numpy: embeddings plus the first L position rows, the encoder
    with pad keys (and, if causal, later keys) masked, then pooling over the real tokens."""
    from tests.models.test_vit import np_encoder, np_map_head

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    batch, length = tokens.shape
    x = p["Embed_0"]["embedding"][tokens] + p["pos_embedding"][:, :length]
    real = tokens != 0
    mask = np.broadcast_to(real[:, None, :], (batch, length, length))
    if causal:
        mask = mask & np.tri(length, dtype=bool)[None]
    encoded = np_encoder(x, p["Encoder_0"], depth, mask)
    if pool == "map":
        return np_map_head(encoded, p["MAPHead_0"], real)
    return reference_pool(encoded, tokens, pool)


@pytest.mark.parametrize("pool,causal", [("last", True), ("mean", False), ("map", True)])
def test_forward_matches_numpy_reference(pool, causal):
    model = text_transformer.Model(**TINY, pool_type=pool, causal=causal)
    params = init(model)
    features, _ = apply(model, params, TOKENS)
    expected = np_text_transformer(params, TOKENS, TINY["depth"], pool, causal)
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_jax_nn_attention_matches_numpy_reference(causal):
    # attention_impl="xla" runs jax.nn.dot_product_attention (the function "cudnn" runs on GPUs)
    # with the key-padding, causal and MAP-pooling masks laid out as flax's attention takes them.
    model = text_transformer.Model(**TINY, pool_type="map", causal=causal, attention_impl="xla")
    params = init(model)
    features, _ = apply(model, params, TOKENS)
    expected = np_text_transformer(params, TOKENS, TINY["depth"], "map", causal)
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=2e-5)


def test_causal_mask_hides_future_tokens():
    tokens = TOKENS[2:3]
    changed = tokens.copy()
    changed[0, 5] = 13
    for causal in (True, False):
        model = text_transformer.Model(**TINY, causal=causal)
        params = init(model)
        _, before = apply(model, params, tokens)
        _, after = apply(model, params, changed)
        prefix_same = np.allclose(before["encoded"][0, :5], after["encoded"][0, :5], atol=1e-6)
        assert prefix_same == causal
        assert not np.allclose(before["encoded"][0, 5:], after["encoded"][0, 5:])


def test_map_pooling_matches_probe_attention_over_real_tokens():
    from tests.models.test_vit import np_map_head

    model = text_transformer.Model(**TINY, pool_type="map")
    params = init(model)
    features, aux = apply(model, params, TOKENS)
    map_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params["MAPHead_0"])
    expected = np_map_head(np.asarray(aux["encoded"], np.float64), map_params, TOKENS != 0)
    np.testing.assert_allclose(features, expected, atol=2e-5)


def test_scan_and_python_loop_agree():
    loop_model = text_transformer.Model(**TINY, pool_type="mean", causal=True)
    scan_model = text_transformer.Model(**TINY, pool_type="mean", causal=True, scan=True)
    loop_params = init(loop_model)
    scan_params = vit.pyloop_to_scan(loop_params, encoder_name="Encoder_0")
    expected_tree = jax.eval_shape(scan_model.init, jax.random.key(0), TOKENS)["params"]
    assert jax.tree.structure(expected_tree) == jax.tree.structure(scan_params)
    loop_out, _ = apply(loop_model, loop_params, TOKENS)
    scan_out, _ = apply(scan_model, scan_params, TOKENS)
    np.testing.assert_allclose(scan_out, loop_out, atol=1e-5)


def test_bfloat16_matmuls_keep_float32_params_and_features():
    from tests.models.test_vit import _all_eqns

    model = text_transformer.Model(**TINY, pool_type="map", causal=True, dtype_mm="bfloat16")
    params = init(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t)[0])(params, TOKENS)
    contractions = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # Each block: query, key and value projections, attention logits, weighted values, output
    # projection, two MLP layers; the MAP head adds the same eight. All take bfloat16 operands.
    assert len(contractions) == 8 * TINY["depth"] + 8
    for eqn in contractions:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn

    features, _ = apply(model, params, TOKENS)
    float32_model = text_transformer.Model(**TINY, pool_type="map", causal=True)
    reference, _ = apply(float32_model, params, TOKENS)
    assert features.dtype == jnp.float32
    np.testing.assert_allclose(features, reference, atol=0.1, rtol=0.1)
    # bfloat16 keeps 8 mantissa bits: the features move by about 1e-2, far above float32 rounding.
    assert float(np.max(np.abs(features - reference))) > 1e-3


def test_head_and_dropout():
    model = text_transformer.Model(6, **TINY, dropout=0.3)
    params = init(model)
    assert params["head"]["kernel"].shape == (32, 6)
    eval_out, aux = apply(model, params, TOKENS)
    np.testing.assert_array_equal(eval_out, np.broadcast_to(params["head"]["bias"], (3, 6)))
    _, train_aux = apply(model, params, TOKENS, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_aux["pre_logits"], aux["pre_logits"])


def test_invalid_configurations_fail_clearly():
    with pytest.raises(ValueError, match="exceeds max_len 16"):
        init(text_transformer.Model(**TINY), np.ones((1, 17), np.int32))
    with pytest.raises(ValueError, match="pool_type"):
        init(text_transformer.Model(**TINY, pool_type="cls"))
    with pytest.raises(ValueError, match="patch size"):
        text_transformer.Model(vocab_size=VOCAB, variant="B/16")
    with pytest.raises(ValueError, match="Unknown attention_impl 'flash'"):
        init(text_transformer.Model(**TINY, attention_impl="flash"))
