"""big_vision-format ViT checkpoints: round trips, position-embedding resampling, old layouts,
scan/loop conversion and the error messages for checkpoints that do not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import pretrained, vit

TINY = dict(variant="mu/4", depth=2, pool_type="tok")


def make_params(image_size=16, seed=0, **overrides):
    model = vit.Model(**{**TINY, **overrides})
    images = jnp.zeros((1, image_size, image_size, 3))
    params = model.init(jax.random.key(seed), images)["params"]
    if "cls" in params:  # zeros at init; random values make the class-token checks meaningful
        params = {**params, "cls": jax.random.normal(jax.random.key(seed + 100), (1, 1, 32))}
    return model, params


def flat(tree):
    return pretrained.flatten_params(tree)


def np_bilinear(grid, out_h, out_w):
    """Separable bilinear resize with half-pixel centres and edge clamping. grid: [h, w, D]."""

    def resize_axis(array, out_size, axis):
        in_size = array.shape[axis]
        src = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
        src = np.clip(src, 0, in_size - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        frac = (src - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
        return np.take(array, low, axis) * (1 - frac) + np.take(array, high, axis) * frac

    return resize_axis(resize_axis(grid, out_h, 0), out_w, 1)


def test_npz_uses_big_vision_names(tmp_path):
    _, params = make_params()
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    with np.load(tmp_path / "vit.npz") as data:
        names = set(data.files)
    assert {
        "embedding/kernel",
        "embedding/bias",
        "cls",
        "pos_embedding",
        "Transformer/encoder_norm/scale",
        "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel",
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
        "Transformer/encoderblock_0/LayerNorm_1/bias",
    } <= names
    assert len(names) == len(flat(params))


def test_round_trip_at_same_resolution_is_exact(tmp_path):
    model, params = make_params()
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_round_trip_to_higher_resolution_resamples_position_embeddings(tmp_path):
    _, params = make_params(image_size=16)  # 4 x 4 patches
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    model = vit.Model(**TINY)
    target = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 24, 24, 3)))["params"]
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target)  # 6 x 6 patches

    old_grid = np.asarray(params["pos_embedding"]).reshape(4, 4, 32)
    expected = np_bilinear(old_grid, 6, 6).reshape(1, 36, 32)
    np.testing.assert_allclose(loaded["pos_embedding"], expected, atol=1e-6)
    for name, value in flat(loaded).items():
        if name != "pos_embedding":
            np.testing.assert_array_equal(value, flat(params)[name], err_msg=name)
    features, _ = model.apply({"params": loaded}, jnp.ones((2, 24, 24, 3)))
    assert features.shape == (2, 32)


def test_non_square_grid_and_bicubic(tmp_path):
    _, params = make_params()
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    model = vit.Model(**TINY)
    target = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 24, 16, 3)))["params"]
    with pytest.raises(ValueError, match="posemb_grid"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", target)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_grid=(6, 4))
    expected = np_bilinear(np.asarray(params["pos_embedding"]).reshape(4, 4, 32), 6, 4)
    np.testing.assert_allclose(loaded["pos_embedding"], expected.reshape(1, 24, 32), atol=1e-6)

    # Bicubic weights sum to one, so a constant table stays constant; a ramp is not preserved
    # exactly at the borders, which distinguishes it from bilinear.
    constant = jnp.full((1, 16, 8), 0.25)
    resized = pretrained.resample_posemb(constant, (7, 7), method="bicubic")
    np.testing.assert_allclose(resized, np.full((1, 49, 8), 0.25), atol=1e-6)
    table = jax.random.normal(jax.random.key(0), (1, 16, 8))
    bicubic = pretrained.resample_posemb(table, (7, 7), method="bicubic")
    bilinear = pretrained.resample_posemb(table, (7, 7), method="bilinear")
    assert bicubic.shape == (1, 49, 8) and not np.allclose(bicubic, bilinear, atol=1e-3)
    with pytest.raises(ValueError, match="resize method"):
        pretrained.resample_posemb(table, (7, 7), method="area")


def test_patch_size_change_resamples_grid_and_reinitialises_stem(tmp_path):
    _, params = make_params(image_size=16)  # /4 -> 4 x 4 grid
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    model = vit.Model(**{**TINY, "variant": "mu/2"})
    init = model.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)))["params"]  # 8 x 8 grid
    with pytest.raises(
        ValueError,
        match=r"shape mismatch.*embedding/kernel: checkpoint "
        r"\(4, 4, 3, 32\) vs model \(2, 2, 3, 32\)",
    ):
        pretrained.load_vit_npz(tmp_path / "vit.npz", init)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", init, dont_load=["embedding/.*"])
    np.testing.assert_array_equal(loaded["embedding"]["kernel"], init["embedding"]["kernel"])
    expected = np_bilinear(np.asarray(params["pos_embedding"]).reshape(4, 4, 32), 8, 8)
    np.testing.assert_allclose(loaded["pos_embedding"], expected.reshape(1, 64, 32), atol=1e-6)
    np.testing.assert_array_equal(loaded["cls"], params["cls"])


@pytest.mark.parametrize("save_scan", [False, True])
def test_checkpoint_layout_follows_the_model(tmp_path, save_scan):
    loop_model, loop_params = make_params()
    scan_model = vit.Model(**TINY, scan=True)
    scan_params = vit.pyloop_to_scan(loop_params)
    pretrained.save_vit_npz(tmp_path / "vit.npz", scan_params if save_scan else loop_params)
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    expected, _ = loop_model.apply({"params": loop_params}, images)
    for model, init in ((loop_model, loop_params), (scan_model, scan_params)):
        shapes = jax.eval_shape(lambda p: p, init)
        loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", shapes)
        assert jax.tree.structure(loaded) == jax.tree.structure(init)
        out, _ = model.apply({"params": loaded}, images)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_original_vit_layout_is_converted(tmp_path):
    """Pre-linen numbering, posemb under Transformer/posembed_input, and a [cls] posemb row."""
    _, params = make_params()
    cls_row = np.full((1, 1, 32), 0.5, np.float32)
    old = {}
    for name, value in flat(params).items():
        name = (
            name.replace("MlpBlock_0", "MlpBlock_3")
            .replace("LayerNorm_1", "LayerNorm_2")
            .replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
        )
        if name == "pos_embedding":
            name, value = (
                "Transformer/posembed_input/pos_embedding",
                np.concatenate([cls_row, np.asarray(value)], axis=1),
            )
        old[name] = np.asarray(value)
    np.savez(tmp_path / "old.npz", **old)

    loaded = pretrained.load_vit_npz(tmp_path / "old.npz", params)
    expected = dict(flat(params))
    expected["cls"] = np.asarray(params["cls"]) + cls_row
    for name, value in flat(loaded).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-7, err_msg=name)


def test_replacing_a_classifier_head(tmp_path):
    _, params = make_params(num_classes=10, head_zeroinit=False)
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    _, init = make_params(seed=7, num_classes=3)
    with pytest.raises(ValueError, match="head/kernel: checkpoint \\(32, 10\\) vs model"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", init)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", init, dont_load=["head/.*"])
    np.testing.assert_array_equal(loaded["head"]["bias"], init["head"]["bias"])
    np.testing.assert_array_equal(loaded["pos_embedding"], params["pos_embedding"])
    # Without a head in the model, the checkpoint's head is dropped the same way.
    _, headless = make_params(seed=7)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", headless, dont_load=["head/.*"])
    assert "head" not in loaded


def test_checkpoints_that_do_not_fit_are_reported_by_name(tmp_path):
    _, params = make_params()
    entries = {name: np.asarray(value) for name, value in flat(params).items()}
    del entries["Transformer/encoder_norm/scale"]
    entries["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    np.savez(tmp_path / "bad.npz", **entries)
    with pytest.raises(ValueError) as err:
        pretrained.load_vit_npz(tmp_path / "bad.npz", params)
    message = str(err.value)
    assert "missing from checkpoint (1): Transformer/encoder_norm/scale" in message
    assert "unexpected in checkpoint (1): pre_logits/kernel" in message

    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    _, wider = make_params(width=48, num_heads=2, posemb="sincos2d")
    with pytest.raises(
        ValueError, match="Transformer/encoder_norm/bias: checkpoint \\(32,\\) vs model \\(48,\\)"
    ):
        pretrained.load_vit_npz(tmp_path / "vit.npz", wider, dont_load=["pos_embedding"])
    with pytest.raises(ValueError, match="'decoder/.\\*' matches no parameter"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", params, dont_load=["decoder/.*"])
    shapes = jax.eval_shape(lambda p: p, params)
    with pytest.raises(ValueError, match="'cls' is kept from init_params"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", shapes, dont_load=["cls"])


def test_bfloat16_params_are_saved_as_float32(tmp_path):
    _, params = make_params()
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    pretrained.save_vit_npz(tmp_path / "vit.npz", half)
    with np.load(tmp_path / "vit.npz") as data:
        assert data["cls"].dtype == np.float32
        np.testing.assert_array_equal(data["cls"], np.asarray(half["cls"], np.float32))
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", half)
    assert loaded["cls"].dtype == jnp.bfloat16


def test_non_square_table_that_fits_is_not_mistaken_for_a_class_token_row(tmp_path):
    # 2 x 5 = 10 entries = 1 + 3 * 3: the old-layout heuristic must not fire when the table fits.
    model = vit.Model(**TINY)
    images = jnp.zeros((1, 8, 20, 3))
    params = model.init(jax.random.key(0), images)["params"]
    assert params["pos_embedding"].shape == (1, 10, 32)
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", params, posemb_grid=(2, 5))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
