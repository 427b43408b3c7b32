"""Two-tower model: outputs, projections, noise and temperature options, config building, LiT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive.freezing import freeze, frozen_mask
from contrastive.losses import make_loss
from contrastive.mesh import make_mesh
from contrastive.objectives import contrastive_objective
from contrastive.step import init_train_state, make_train_step
from models import pretrained, text_transformer, vit
from models.heteroscedastic import NoiseConfig, Sampling, TemperatureConfig
from models.two_towers import (
    TwoTowers,
    example_inputs,
    l2_normalize,
    load_pretrained_towers,
    two_towers_from_config,
)

KEY = jax.random.key(0)
IMAGE_TOWER = {"name": "vit", "variant": "mu/8", "pool_type": "gap"}
TEXT_TOWER = {"name": "text_transformer", "variant": "mu", "vocab_size": 50, "max_len": 6}


def inputs(batch=3, size=16, length=6, seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 50, (batch, length)), jnp.int32)
    return images, tokens


@pytest.mark.parametrize("embed_dim", [24, None])
def test_outputs_are_unit_norm_with_noise_tau_and_bias(embed_dim):
    model = TwoTowers(
        IMAGE_TOWER,
        TEXT_TOWER,
        embed_dim=embed_dim,
        image_noise=NoiseConfig(num_factors=3),
        text_noise=True,
        temperature=TemperatureConfig("bounded", init=0.1, lo=0.01, hi=1.0),
        bias_init=-10.0,
    )
    images, tokens = inputs()
    params = model.init(KEY, images, tokens)
    outputs = model.apply(params, images, tokens)
    dim = embed_dim or 32  # mu width
    for side in ("image", "text"):
        embedding = outputs[f"{side}_embedding"]
        assert embedding.shape == (3, dim) and embedding.dtype == jnp.float32
        np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
        assert outputs[f"{side}_norm"].shape == (3,)
    for name in ("noise", "text_noise"):
        assert outputs[name].factors.shape == (3, dim, 3)
        assert outputs[name].diag_scale.shape == (3, dim)
    assert float(outputs["tau"]) == pytest.approx(0.1, rel=1e-5)
    assert float(outputs["bias"]) == -10.0
    images_only = model.apply(params, images, None)
    assert images_only["text_embedding"] is None
    np.testing.assert_allclose(images_only["image_embedding"], outputs["image_embedding"])
    embedded, _ = model.apply(params, tokens, method=model.embed_texts)
    np.testing.assert_allclose(embedded, outputs["text_embedding"], rtol=1e-6)


def numpy_noise(params, embedding):
    """Parameter-efficient HET-XL noise of embeddings f32[B, D] from its formulas (HETXL.md
    section 2): V = diag(v) J^T, d = softplus(.) + 1e-3, mean shift c * v."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(embedding, np.float64)
    d = np.logaddexp(0.0, x @ p["diag_scale"]["kernel"] + p["diag_scale"]["bias"]) + 1e-3
    v = x @ p["factor_scale"]["kernel"] + p["factor_scale"]["bias"]
    return v[:, :, None] * p["factor_loadings"].T[None], d, v * p["factor_shift"]


def test_each_side_gets_noise_from_its_own_unit_embedding_and_parameters():
    model = TwoTowers(
        IMAGE_TOWER,
        TEXT_TOWER,
        embed_dim=8,
        image_noise=NoiseConfig(num_factors=2),
        text_noise=True,
        temperature=TemperatureConfig("fixed", init=0.2),
    )
    images, tokens = inputs()
    params = model.init(KEY, images, tokens)["params"]
    # Different non-zero shifts on the two sides, so that swapped parameters show.
    params["image_noise_params"]["factor_shift"] = jnp.linspace(-0.3, 0.4, 8)
    params["text_noise_params"]["factor_shift"] = jnp.linspace(0.5, -0.2, 8)
    outputs = model.apply({"params": params}, images, tokens)
    # The towers alone (with their projection to embed_dim) give the unnormalised features.
    image_tower = vit.Model(8, variant="mu/8", pool_type="gap", head_zeroinit=False)
    text_tower = text_transformer.Model(
        8, vocab_size=50, variant="mu", max_len=6, head_zeroinit=False
    )
    sides = [
        (
            "image",
            "noise",
            "image_noise_params",
            image_tower.apply({"params": params["img"]}, images),
        ),
        (
            "text",
            "text_noise",
            "text_noise_params",
            text_tower.apply({"params": params["txt"]}, tokens),
        ),
    ]
    for side, noise_key, noise_params, (features, _) in sides:
        features = np.asarray(features, np.float64)
        norm = np.sqrt(np.sum(features**2, axis=-1))
        np.testing.assert_allclose(outputs[f"{side}_norm"], norm, rtol=1e-5)
        embedding = features / norm[:, None]
        np.testing.assert_allclose(outputs[f"{side}_embedding"], embedding, rtol=1e-5, atol=1e-6)
        factors, diag_scale, mean_shift = numpy_noise(params[noise_params], embedding)
        noise = outputs[noise_key]
        np.testing.assert_allclose(noise.factors, factors, rtol=1e-5, atol=1e-6, err_msg=side)
        np.testing.assert_allclose(noise.diag_scale, diag_scale, rtol=1e-5, err_msg=side)
        np.testing.assert_allclose(noise.mean_shift, mean_shift, rtol=1e-5, atol=1e-6)


def test_deterministic_model_has_no_noise_or_bias_parameters():
    model = TwoTowers(IMAGE_TOWER, TEXT_TOWER, embed_dim=8)
    images, tokens = inputs()
    params = model.init(KEY, images, tokens)["params"]
    assert set(params) == {"img", "txt", "tau"}
    outputs = model.apply({"params": params}, images, tokens)
    assert outputs["noise"] is None and outputs["bias"] is None


def test_l2_normalize_has_finite_gradient_at_zero():
    # The trap of a zero-initialised projection: x / ||x|| has a 0/0 gradient at x = 0.
    grad = jax.grad(lambda x: l2_normalize(x).sum())(jnp.zeros((2, 4)))
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_allclose(l2_normalize(jnp.array([[3.0, 4.0]])), [[0.6, 0.8]], rtol=1e-6)


def test_projection_heads_are_not_zero_initialised():
    model = TwoTowers(IMAGE_TOWER, TEXT_TOWER, embed_dim=8)
    images, tokens = inputs()
    params = model.init(KEY, images, tokens)["params"]
    assert float(jnp.abs(params["img"]["head"]["kernel"]).max()) > 0
    assert float(jnp.abs(params["txt"]["head"]["kernel"]).max()) > 0
    grads = jax.grad(lambda p: model.apply({"params": p}, images, tokens)["image_embedding"].sum())(
        params
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_from_config_builds_the_same_model_and_rejects_unknown_keys():
    config = {
        "image_tower": IMAGE_TOWER,
        "text_tower": TEXT_TOWER,
        "embed_dim": 8,
        "noise": {"num_factors": 2, "diag_scale_init": 0.02},
        "temperature": {"mode": "log_scale"},
        "image_size": 16,
        "text_length": 6,
    }
    model = two_towers_from_config(config)
    assert model.image_noise == NoiseConfig(num_factors=2, diag_scale_init=0.02)
    assert model.temperature == TemperatureConfig("log_scale")
    images, tokens = example_inputs(config, batch=2)
    assert images.shape == (2, 16, 16, 3) and tokens.shape == (2, 6)
    with pytest.raises(ValueError, match="embed_dims"):
        two_towers_from_config(config | {"embed_dims": 3})
    with pytest.raises(ValueError, match="num_factor"):
        two_towers_from_config(config | {"noise": {"num_factor": 2}})
    with pytest.raises(KeyError, match="known towers"):
        two_towers_from_config(config | {"image_tower": {"name": "resnet"}}).init(
            KEY, images, tokens
        )


def test_lit_loads_both_pretrained_towers_and_keeps_the_locked_ones_bit_identical(tmp_path):
    # A big_vision-style checkpoint of a mu/8 ViT at 16 px, loaded into a 24 px model.
    source = vit.Model(variant="mu/8", pool_type="tok")
    source_params = source.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)))["params"]
    pretrained.save_vit_npz(tmp_path / "vit.npz", source_params)
    model = TwoTowers(
        {"name": "vit", "variant": "mu/8", "pool_type": "tok"},
        {"name": "bert_minilm"},  # all-MiniLM-L6-v2 shapes (512 positions)
        embed_dim=8,
        image_noise=NoiseConfig(num_factors=2, diag_scale_init=0.05, kernel_init_scale=0.1),
        temperature=TemperatureConfig("bounded_log", init=0.1, lo=0.01, hi=1.0),
    )
    batch = {
        "image": jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 24, 24, 3)), jnp.float32),
        "text": jnp.asarray(np.random.default_rng(2).integers(1000, 2000, (8, 16)), jnp.int32),
    }
    rules = ["img/.*", "txt/(?!head/).*"]  # lock both towers, train the projections (LiT)

    def init_params(key):
        return model.init(key, batch["image"][:1], batch["text"][:1])["params"]

    def load(params):
        return load_pretrained_towers(params, {"npz": str(tmp_path / "vit.npz")}, "minilm")

    mesh = make_mesh({"data": 8})
    optimizer = freeze(optax.adam(1e-2), rules)
    state, shardings = init_train_state(init_params, optimizer, KEY, mesh, load_params=load)
    minilm = pretrained.load_minilm_params(None)
    np.testing.assert_array_equal(
        state.params["txt"]["embeddings"]["word_embeddings"]["embedding"],
        minilm["embeddings"]["word_embeddings"]["embedding"],
    )
    np.testing.assert_array_equal(
        state.params["img"]["Transformer"]["encoder_norm"]["scale"],
        source_params["Transformer"]["encoder_norm"]["scale"],
    )
    before = jax.device_get(state.params)
    loss = make_loss("hetxl", sampling=Sampling(train_samples=4, chunk_size=2), column_chunk_size=8)
    mask = frozen_mask(before, rules)
    step = make_train_step(
        contrastive_objective(model, loss, mesh), optimizer, mesh, shardings, mask
    )
    for _ in range(2):
        state, metrics = step(state, batch)
    after = jax.device_get(state.params)
    flat_mask = jax.tree.leaves(mask)
    for is_frozen, old, new in zip(
        flat_mask, jax.tree.leaves(before), jax.tree.leaves(after), strict=True
    ):
        if is_frozen:
            np.testing.assert_array_equal(old, new)
    changed = [
        not np.array_equal(o, n)
        for f, o, n in zip(flat_mask, jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        if not f
    ]
    assert all(changed), "every trainable leaf (projections, noise, tau) moved"
    # No optimizer state (Adam moments) exists for frozen leaves.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    trainable_size = sum(
        np.size(p) for f, p in zip(flat_mask, jax.tree.leaves(after), strict=True) if not f
    )
    assert state_size <= 2 * trainable_size + 8
