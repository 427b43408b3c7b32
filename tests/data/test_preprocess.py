"""The op-string parser, its error messages, and each preprocessing op against numpy/Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data.ops import PP_OPS, RESIZE_METHODS
from data.preprocess import PreprocessError, parse_pp, split_ops
from tests.data.helpers import encode_image

ALL_OPS = {
    "decode",
    "resize",
    "resize_small",
    "random_crop",
    "central_crop",
    "inception_crop",
    "flip_lr",
    "value_range",
    "grey_to_rgb",
    "to_rgb",
    "tokenize",
    "keep",
    "drop",
}


def seeded(data: dict, seed: int = 0) -> dict:
    return {**data, "_rng": tf.constant([seed, 17], tf.int64)}


def test_registry_lists_the_documented_ops():
    assert ALL_OPS <= set(PP_OPS.known())


def test_split_respects_quotes_and_brackets():
    assert split_ops("a(1)| b('x|y') |c((1, 2))") == ["a(1)", "b('x|y')", "c((1, 2))"]


@pytest.mark.parametrize(
    "pp, fragments",
    [
        ("decode|resise(64)", ["'resise'", "op 2", "known ops", "resize", "tokenize"]),
        ("resize()", ["'resize'", "missing a required argument", "known ops"]),
        ("resize(32, 'image', 'bilinear', True, 5)", ["too many positional", "known ops"]),
        ("resize('64')", ["size='64'", "int | tuple[int, int]"]),
        ("resize(True)", ["size=True"]),
        ("value_range(-1, '1')", ["vmax='1'", "float"]),
        ("tokenize(max_len=16, keyy='text')", ["unexpected keyword", "keyy", "tokenize("]),
        ("keep('image', 3)", ["keys=3", "str"]),
        ("resize(x)", ["not a literal"]),
        ("resize(64)||flip_lr", ["empty op"]),
        ("resize(64", ["cannot parse"]),
        ("resize(64, method='bilinearr')", ["unknown method", "bilinear"]),
        ("tokenize(8, model='sentencepiece:/no/such/file.model')", ["no file"]),
        ("tokenize(8, model='bpe')", ["unknown tokenizer"]),
    ],
)
def test_bad_op_strings_name_the_problem(pp, fragments):
    with pytest.raises(PreprocessError) as error:
        parse_pp(pp)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_parse_records_ops_and_arguments():
    fn = parse_pp("decode | resize((4, 6)) | value_range(-1, 1, clip=True) | tokenize(max_len=5)")
    assert fn.ops == [
        ("decode", (), {}),
        ("resize", ((4, 6),), {}),
        ("value_range", (-1, 1), {"clip": True}),
        ("tokenize", (), {"max_len": 5}),
    ]


def test_empty_string_is_identity():
    data = {"x": tf.constant([1, 2])}
    assert parse_pp("")(data)["x"].numpy().tolist() == [1, 2]


def test_decode_png_matches_pillow_and_passes_arrays_through():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    decode = parse_pp("decode")
    out = decode({"image": tf.constant(encode_image(rgb))})["image"].numpy()
    np.testing.assert_array_equal(out, rgb)
    out = decode({"image": tf.constant(encode_image(grey))})["image"].numpy()
    np.testing.assert_array_equal(out, np.stack([grey] * 3, -1))
    out = decode({"image": tf.constant(grey[..., None])})["image"].numpy()
    np.testing.assert_array_equal(out, np.stack([grey] * 3, -1))
    out = parse_pp("decode(channels=1)")({"image": tf.constant(encode_image(grey))})["image"]
    np.testing.assert_array_equal(out.numpy()[..., 0], grey)


def test_decode_of_corrupt_bytes_raises():
    with pytest.raises(tf.errors.InvalidArgumentError):
        parse_pp("decode")({"image": tf.constant(b"not an image")})


def test_grey_to_rgb_and_to_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    out = parse_pp("grey_to_rgb")({"image": tf.constant(grey)})["image"].numpy()
    np.testing.assert_array_equal(out, np.concatenate([grey] * 3, -1))
    rgba = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    out = parse_pp("to_rgb")({"image": tf.constant(rgba)})["image"].numpy()
    np.testing.assert_array_equal(out, rgba[..., :3])
    with pytest.raises(ValueError, match="channels"):
        parse_pp("grey_to_rgb")({"image": tf.constant(rgba)})


def test_resize_nearest_matches_numpy_repeat_and_outputs_float():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = parse_pp("resize((4, 6), method='nearest')")({"image": tf.constant(image)})["image"]
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), image.repeat(2, 0).repeat(2, 1).astype(np.float32))


def test_resize_keeps_a_constant_image_constant_both_ways():
    image = np.full((40, 30, 3), 77, np.uint8)
    for pp in ("resize(8)", "resize(64)", "resize_small(10)"):
        out = parse_pp(pp)({"image": tf.constant(image)})["image"].numpy()
        np.testing.assert_allclose(out, 77.0, atol=1e-3)
    assert parse_pp("resize_small(10)")({"image": tf.constant(image)})["image"].shape == (13, 10, 3)


@pytest.mark.parametrize("method", ["bilinear", "nearest", "bicubic", "area", "lanczos3"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_resize_to_the_own_size_gives_what_tf_image_resize_gives(method, dtype):
    image = np.random.default_rng(0).integers(0, 256, (28, 20, 3)).astype(dtype)
    out = parse_pp(f"resize((28, 20), method={method!r})")({"image": tf.constant(image)})["image"]
    expected = tf.image.resize(image, (28, 20), method=method, antialias=False)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), tf.cast(expected, tf.float32).numpy())


def test_central_crop_is_the_centre_window():
    image = np.arange(6 * 8 * 1, dtype=np.uint8).reshape(6, 8, 1)
    out = parse_pp("central_crop((2, 4))")({"image": tf.constant(image)})["image"].numpy()
    np.testing.assert_array_equal(out, image[2:4, 2:6])


def test_random_crop_is_a_window_that_depends_only_on_the_seed():
    image = np.arange(10 * 10, dtype=np.int32).reshape(10, 10, 1)
    crop = parse_pp("random_crop(4)")
    corners = set()
    for seed in range(12):
        out = crop(seeded({"image": tf.constant(image)}, seed))["image"].numpy()
        top, left = divmod(int(out[0, 0, 0]), 10)
        np.testing.assert_array_equal(out, image[top : top + 4, left : left + 4])
        again = crop(seeded({"image": tf.constant(image)}, seed))["image"].numpy()
        np.testing.assert_array_equal(out, again)
        corners.add((top, left))
    assert len(corners) > 3


def test_flip_lr_flips_about_half_the_time():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    flips = 0
    for seed in range(40):
        out = parse_pp("flip_lr")(seeded({"image": tf.constant(image)}, seed))["image"].numpy()
        if np.array_equal(out, image[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 8 <= flips <= 32


def test_inception_crop_output_size_and_determinism():
    image = np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    crop = parse_pp("inception_crop(16, area_min=20)")
    first = crop(seeded({"image": tf.constant(image)}, 3))["image"].numpy()
    assert first.shape == (16, 16, 3)
    np.testing.assert_array_equal(first, crop(seeded({"image": tf.constant(image)}, 3))["image"])
    other = crop(seeded({"image": tf.constant(image)}, 4))["image"].numpy()
    assert not np.array_equal(first, other)


def test_random_ops_need_a_seed():
    with pytest.raises(KeyError, match="_rng"):
        parse_pp("flip_lr")({"image": tf.zeros([2, 2, 3])})


def test_value_range_matches_the_affine_formula():
    image = np.array([[[0, 51, 255]]], np.uint8)
    out = parse_pp("value_range(-1, 1)")({"image": tf.constant(image)})["image"].numpy()
    np.testing.assert_allclose(out, image / 255.0 * 2 - 1, rtol=1e-6)
    out = parse_pp("value_range(0, 1, in_min=0, in_max=100, clip=True)")(
        {"image": tf.constant(image)}
    )["image"].numpy()
    np.testing.assert_allclose(out, [[[0.0, 0.51, 1.0]]], rtol=1e-6)


def test_keep_and_drop_leave_internal_keys_and_reject_typos():
    data = {
        "image": tf.zeros([1]),
        "text": tf.constant("a"),
        "label": tf.constant(1),
        "_rng": tf.constant([0, 0], tf.int64),
    }
    assert set(parse_pp("keep('image', 'text')")(data)) == {"image", "text", "_rng"}
    assert set(parse_pp("drop('label')")(data)) == {"image", "text", "_rng"}
    with pytest.raises(KeyError, match="labels"):
        parse_pp("drop('labels')")(data)


def test_tokenize_op_writes_padded_int32_ids():
    out = parse_pp("tokenize(max_len=6, out_key='ids')")({"text": tf.constant("a shoe")})
    assert out["ids"].dtype == tf.int32 and out["ids"].shape == (6,)
    ids = out["ids"].numpy().tolist()
    assert ids[0] == 101 and 102 in ids and ids[-1] == 0
    assert out["text"].numpy() == b"a shoe"


def test_the_resize_methods_checked_without_tensorflow_are_tensorflows():
    methods = tf.image.ResizeMethod
    assert RESIZE_METHODS == tuple(
        sorted(getattr(methods, name) for name in dir(methods) if name.isupper())
    )
