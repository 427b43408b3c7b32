"""big_vision-format ViT checkpoints: round trips, position-embedding resampling, old layouts,
class-token position rows (original ViT vs big_vision layout), scan/loop conversion and the error
messages for checkpoints that do not fit."""

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


def shapes(image_size=16, **overrides):
    model = vit.Model(**{**TINY, **overrides})
    images = jnp.zeros((1, image_size, image_size, 3))
    return model, jax.eval_shape(model.init, jax.random.key(1), images)["params"]


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


def resized_table(table, class_rows, old_grid, new_grid):
    """The class-token rows kept aside, the grid rows resized with `np_bilinear`."""
    table = np.asarray(table)
    grid = table[0, class_rows:].reshape(*old_grid, table.shape[-1])
    resized = np_bilinear(grid, *new_grid).reshape(1, -1, table.shape[-1])
    return np.concatenate([table[:, :class_rows], resized], axis=1)


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


@pytest.mark.parametrize("posemb_cls", [True, False])
def test_round_trip_to_higher_resolution_resamples_position_embeddings(tmp_path, posemb_cls):
    _, params = make_params(image_size=16, posemb_cls=posemb_cls)  # 4 x 4 patches
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    model, target = shapes(image_size=24, posemb_cls=posemb_cls)  # 6 x 6 patches
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_cls=posemb_cls)

    expected = resized_table(params["pos_embedding"], int(posemb_cls), (4, 4), (6, 6))
    assert expected.shape == (1, posemb_cls + 36, 32)
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
    # 1 + 6 * 4 = 25 rows would also be a 5 x 5 grid without a class row.
    assert target["pos_embedding"].shape == (1, 25, 32)
    with pytest.raises(ValueError, match="not a square grid: pass posemb_grid"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", target)
    with pytest.raises(ValueError, match=r"posemb_grid=\(6, 4\) does not fit .* 25 rows \(0 for"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_grid=(6, 4), posemb_cls=False)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_grid=(6, 4))
    expected = resized_table(params["pos_embedding"], 1, (4, 4), (6, 4))
    np.testing.assert_allclose(loaded["pos_embedding"], expected, atol=1e-6)

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
    expected = resized_table(params["pos_embedding"], 1, (4, 4), (8, 8))
    np.testing.assert_allclose(loaded["pos_embedding"], expected, atol=1e-6)
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
    """Pre-linen numbering, posemb under Transformer/posembed_input, and a [cls] posemb row
    folded into `cls` for a big_vision-layout model."""
    _, params = make_params(posemb_cls=False)
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

    loaded = pretrained.load_vit_npz(tmp_path / "old.npz", params, posemb_cls=False)
    expected = dict(flat(params))
    expected["cls"] = np.asarray(params["cls"]) + cls_row
    for name, value in flat(loaded).items():
        np.testing.assert_allclose(value, expected[name], atol=1e-7, err_msg=name)

    # The default layout has a class row of its own: the table is taken as it is.
    _, target = shapes()
    loaded = pretrained.load_vit_npz(tmp_path / "old.npz", target)
    np.testing.assert_array_equal(
        loaded["pos_embedding"], old["Transformer/posembed_input/pos_embedding"]
    )
    np.testing.assert_array_equal(loaded["cls"], params["cls"])


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
    param_shapes = jax.eval_shape(lambda p: p, params)
    with pytest.raises(ValueError, match="'cls' is kept from init_params"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", param_shapes, dont_load=["cls"])


def test_position_tables_that_do_not_fit_are_reported_by_name(tmp_path):
    _, params = make_params()  # [cls] + 4 x 4
    entries = {name: np.asarray(value) for name, value in flat(params).items()}
    entries["pos_embedding"] = entries["pos_embedding"][:, :7]
    np.savez(tmp_path / "odd.npz", **entries)
    with pytest.raises(ValueError, match=r"Checkpoint pos_embedding \(1, 7, 32\) is neither"):
        pretrained.load_vit_npz(tmp_path / "odd.npz", params)

    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    _, big_vision_target = shapes(image_size=24, posemb_cls=False)  # 6 x 6 = 36 rows
    with pytest.raises(ValueError, match="36 rows .* pass posemb_grid.*or posemb_cls=False"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", big_vision_target)
    with pytest.raises(ValueError, match=r"posemb_grid=\(5, 5\) does not fit .* 17 rows"):
        pretrained.load_vit_npz(tmp_path / "vit.npz", params, posemb_grid=(5, 5))


def test_bfloat16_params_are_saved_as_float32(tmp_path):
    _, params = make_params()
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    pretrained.save_vit_npz(tmp_path / "vit.npz", half)
    with np.load(tmp_path / "vit.npz") as data:
        assert data["cls"].dtype == np.float32
        np.testing.assert_array_equal(data["cls"], np.asarray(half["cls"], np.float32))
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", half)
    assert loaded["cls"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "posemb_cls, image_shape, grid, rows",
    [
        (False, (8, 20), (2, 5), 10),  # 2 x 5 = 1 + 3 * 3: not [cls] + a 3 x 3 grid
        (True, (8, 16), (2, 4), 9),  # 1 + 2 * 4 = 3 * 3: not a 3 x 3 grid without [cls]
    ],
)
def test_non_square_table_that_fits_is_taken_as_is(tmp_path, posemb_cls, image_shape, grid, rows):
    # Conversions and resampling must not fire when the table already fits.
    model = vit.Model(**TINY, posemb_cls=posemb_cls)
    params = model.init(jax.random.key(0), jnp.zeros((1, *image_shape, 3)))["params"]
    assert params["pos_embedding"].shape == (1, rows, 32)
    pretrained.save_vit_npz(tmp_path / "vit.npz", params)
    for posemb_grid in (None, grid):
        loaded = pretrained.load_vit_npz(
            tmp_path / "vit.npz", params, posemb_cls=posemb_cls, posemb_grid=posemb_grid
        )
        jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("source_cls", [True, False])
def test_loading_across_layouts_at_the_same_grid_gives_the_same_network(tmp_path, source_cls):
    source_model, source = make_params(posemb_cls=source_cls)
    table, cls = np.asarray(source["pos_embedding"]), np.asarray(source["cls"])
    if source_cls:  # a random class row, so that dropping it instead of folding it would show
        assert not np.allclose(table[:, 0], 0)
    pretrained.save_vit_npz(tmp_path / "vit.npz", source)
    model, target = shapes(posemb_cls=not source_cls)
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_cls=not source_cls)

    if source_cls:  # row 0 folded into the class token
        np.testing.assert_allclose(loaded["cls"], cls + table[:, :1], atol=1e-7)
        np.testing.assert_array_equal(loaded["pos_embedding"], table[:, 1:])
    else:  # a class row of zeros
        np.testing.assert_array_equal(loaded["cls"], cls)
        np.testing.assert_array_equal(loaded["pos_embedding"][:, 0], np.zeros((1, 32)))
        np.testing.assert_array_equal(loaded["pos_embedding"][:, 1:], table)
    for name, value in flat(loaded).items():
        if name not in ("cls", "pos_embedding"):
            np.testing.assert_array_equal(value, flat(source)[name], err_msg=name)

    images = jax.random.uniform(jax.random.key(4), (3, 16, 16, 3), minval=-1, maxval=1)
    expected, _ = source_model.apply({"params": source}, images)
    out, _ = model.apply({"params": loaded}, images)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source_cls", [True, False])
def test_loading_across_layouts_with_resampling(tmp_path, source_cls):
    _, source = make_params(image_size=16, posemb_cls=source_cls)  # 4 x 4 patches
    table, cls = np.asarray(source["pos_embedding"]), np.asarray(source["cls"])
    pretrained.save_vit_npz(tmp_path / "vit.npz", source)
    model, target = shapes(image_size=24, posemb_cls=not source_cls)  # 6 x 6 patches
    loaded = pretrained.load_vit_npz(tmp_path / "vit.npz", target, posemb_cls=not source_cls)

    grid_rows = table[0, int(source_cls) :].reshape(4, 4, 32)
    resized = np_bilinear(grid_rows, 6, 6).reshape(1, 36, 32)
    if source_cls:  # the class row is not resampled: it is folded into the class token
        expected_table, expected_cls = resized, cls + table[:, :1]
    else:
        expected_table, expected_cls = np.concatenate([np.zeros((1, 1, 32)), resized], 1), cls
    np.testing.assert_allclose(loaded["pos_embedding"], expected_table, atol=1e-6)
    np.testing.assert_allclose(loaded["cls"], expected_cls, atol=1e-7)

    # The same network as the source layout resampled in place, the class row kept aside.
    same_layout_model = vit.Model(**TINY, posemb_cls=source_cls)
    same_layout = {**source, "pos_embedding": resized_table(table, int(source_cls), (4, 4), (6, 6))}
    images = jax.random.uniform(jax.random.key(4), (3, 24, 24, 3), minval=-1, maxval=1)
    expected, _ = same_layout_model.apply({"params": same_layout}, images)
    out, _ = model.apply({"params": loaded}, images)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpoint_classes", [None, 10])
@pytest.mark.parametrize("embed_dim", [None, 16])
def test_lit_image_tower_loads_checkpoints_with_and_without_a_head(
    tmp_path, checkpoint_classes, embed_dim
):
    """LiT: the tower's projection (if any) keeps its init, the checkpoint's classifier head (if
    any) is ignored, and every other parameter comes from the checkpoint."""
    from models.two_towers import load_pretrained_towers, two_towers_from_config

    _, source = make_params(num_classes=checkpoint_classes, head_zeroinit=False)
    pretrained.save_vit_npz(tmp_path / "vit.npz", source)
    model = two_towers_from_config(
        dict(
            image_tower=dict(name="vit", **TINY),
            text_tower=dict(
                name="text_transformer", vocab_size=50, width=32, depth=1, mlp_dim=64, num_heads=2
            ),
            embed_dim=embed_dim,
        )
    )
    init = model.init(jax.random.key(3), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32))
    loaded = load_pretrained_towers(init["params"], {"npz": str(tmp_path / "vit.npz")}, None)
    image = flat(loaded["img"])
    expected = {n: v for n, v in flat(source).items() if not n.startswith("head/")}
    for name, value in expected.items():
        np.testing.assert_array_equal(image[name], value, err_msg=name)
    assert sorted(n for n in image if n.startswith("head/")) == (
        [] if embed_dim is None else ["head/bias", "head/kernel"]
    )
    for name in image:
        if name.startswith("head/"):
            np.testing.assert_array_equal(image[name], flat(init["params"]["img"])[name])
