"""uint8 images scaled on the device, and device prefetch that leaves the saved position alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from data.pipeline import make_global_iterator, make_local_iterator
from data.preprocess import parse_pp
from data.transfer import split_device_value_range
from tests.data.helpers import fashion_config, make_fashion_dir, take, write_files


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    make_fashion_dir(root, n_train=40)
    return root


def reference_value_range(uint8_image: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """value_range's formula in float64: the exact value the float pipeline approximates."""
    return uint8_image.astype(np.float64) / 255 * (vmax - vmin) + vmin


@pytest.mark.parametrize("vmin, vmax", [(-1, 1), (0, 1)])
def test_integral_images_are_bit_identical_after_device_scaling(fashion_dir, vmin, vmax):
    pp = f"decode|grey_to_rgb|value_range({vmin}, {vmax})|tokenize(max_len=20)"
    config = fashion_config(fashion_dir, pp=pp)
    floats = take(make_local_iterator(config, 0, 1), 6)
    uint8_iterator = make_local_iterator(config, 0, 1, uint8_images=True)
    scale = jax.jit(uint8_iterator.device_preprocess)
    for expected, batch in zip(floats, take(uint8_iterator, 6), strict=True):
        assert batch["image"].dtype == np.uint8
        scaled = jax.device_get(scale(batch))
        assert scaled["image"].dtype == np.float32
        np.testing.assert_array_equal(scaled["image"], expected["image"])
        np.testing.assert_allclose(
            scaled["image"], reference_value_range(batch["image"], vmin, vmax), atol=1e-6
        )
        for key in ("text", "label"):
            np.testing.assert_array_equal(scaled[key], expected[key])


def test_resized_images_are_within_half_a_uint8_step(fashion_dir):
    config = fashion_config(fashion_dir)  # decode|resize(32)|flip_lr|value_range(-1, 1)|...
    floats = take(make_local_iterator(config, 0, 1), 4)
    uint8_iterator = make_local_iterator(config, 0, 1, uint8_images=True)
    for expected, batch in zip(floats, take(uint8_iterator, 4), strict=True):
        scaled = jax.device_get(jax.jit(uint8_iterator.device_preprocess)(batch))
        error = np.abs(scaled["image"] - expected["image"]).max()
        assert error <= 1 / 255 * 2 / 2 + 1e-6
        assert error > 0  # resizing produced non-integral values that were rounded


@pytest.mark.parametrize(
    "pp",
    [
        "decode|resize(32)|value_range(-1, 1, clip=True)|tokenize(max_len=20)",
        "decode|resize(32)|value_range(-1, 1, in_min=0, in_max=1)|tokenize(max_len=20)",
        "decode|value_range(0, 255)|resize(32)|tokenize(max_len=20)",
    ],
)
def test_other_op_strings_keep_float_images(fashion_dir, pp):
    iterator = make_local_iterator(fashion_config(fashion_dir, pp=pp), 0, 1, uint8_images=True)
    batch = next(iterator)
    assert batch["image"].dtype == np.float32
    assert iterator.device_preprocess(batch) is batch


def test_the_host_op_string_drops_value_range_and_ends_with_to_uint8():
    host, device = split_device_value_range(
        parse_pp("decode|resize(8)|value_range(-1, 1)|tokenize(max_len=4)|keep('image', 'text')")
    )
    assert [name for name, _, _ in host.ops] == ["decode", "resize", "tokenize", "keep", "to_uint8"]
    assert (device.vmin, device.vmax) == (-1.0, 1.0)


def test_global_uint8_batches_and_device_preprocess(fashion_dir):
    mesh = jax.make_mesh((8,), ("data",))
    config = fashion_config(fashion_dir, batch_size=16)
    floats = take(make_global_iterator(config, mesh), 3)
    iterator = make_global_iterator(config, mesh, uint8_images=True)
    step = jax.jit(lambda batch: iterator.device_preprocess(batch)["image"])
    for expected, batch in zip(floats, take(iterator, 3), strict=True):
        assert batch["image"].dtype == np.uint8
        assert batch["image"].sharding == expected["image"].sharding
        error = np.abs(np.asarray(step(batch)) - np.asarray(expected["image"])).max()
        assert error <= 1 / 255 + 1e-6


def test_device_prefetch_keeps_the_state_of_the_returned_batches(tmp_path):
    files = write_files(tmp_path, 2, 12)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    config = {
        "source": {"name": "tfrecord", "files": files},
        "pp": "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)",
        "batch_size": 4,
        "shuffle_buffer": 5,
        "prefetch": 1,
        # Records 10 and up ("caption 10", ...) fail the text check: skipped counts grow.
        "max_text_bytes": 9,
    }
    plain = make_global_iterator(config, mesh)
    ahead = make_global_iterator(config, mesh, device_prefetch=2)
    for _ in range(8):
        a, b = next(plain), next(ahead)
        assert len(ahead._ahead) == 2
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(plain.get_state(), ahead.get_state())
        assert plain.skipped() == ahead.skipped() == ahead.local_skipped()
    assert plain.skipped()["text_too_long"] > 0
    # A restore drops what was prefetched and continues from the restored position.
    state = plain.get_state()
    expected = take(plain, 3)
    ahead.set_state(state)
    for want, got in zip(expected, take(ahead, 3), strict=True):
        np.testing.assert_array_equal(np.asarray(want["text"]), np.asarray(got["text"]))


def test_device_prefetch_drains_a_finite_pass(tmp_path):
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    config = {
        "source": {"name": "tfrecord", "files": write_files(tmp_path, 2, 6)},
        "pp": "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)",
        "batch_size": 4,
        "shuffle_buffer": 0,
        "num_epochs": 1,
    }
    batches = list(make_global_iterator(config, mesh, device_prefetch=3))
    indices = sorted(int(v) for b in batches for v in np.asarray(b["image"])[:, 0, 0, 0])
    assert indices == list(range(12))
