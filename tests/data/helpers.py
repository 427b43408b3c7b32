"""Small data written by the tests themselves: IDX files, images, TFRecord shards, configs.

Images are encoded with Pillow and IDX files with struct, independently of the code under test.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Writes a uint8 IDX file (magic 0x0000080N, big-endian dims), gzip-compressed or not."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_fashion_dir(
    root: Path, n_train: int = 40, n_test: int = 12, compress: bool = True, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake Fashion-MNIST IDX files in root; returns {split: (images [N,28,28], labels [N])}.

    Pixel (0, 0) of image i holds i % 256 so tests can tell examples apart.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        data[split] = (images, labels)
    return data


def encode_image(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 [H, W] or [H, W, 3] -> encoded bytes, via Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def labelled_image(index: int, size: int = 8) -> np.ndarray:
    """uint8 [size, size, 3]: red = `index` everywhere (decoding recovers it), green a ramp."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = index
    image[..., 1] = np.arange(size, dtype=np.uint8)[None, :] * 10
    return image


def tfrecord_config(files: str, pp: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A config.input block reading TFRecord shards."""
    block = {
        "source": {"name": "tfrecord", "files": files},
        "pp": pp or "decode|resize(8)|value_range(-1, 1)|tokenize(max_len=8)",
        "batch_size": 4,
        "shuffle_buffer": 0,
        "seed": 0,
        "prefetch": 1,
    }
    block.update(overrides)
    return block


def fashion_config(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config.input block reading fake Fashion-MNIST files."""
    block = {
        "source": {"name": "fashion_mnist", "data_dir": str(data_dir), "split": "train"},
        "pp": "decode|resize(32)|flip_lr|value_range(-1, 1)|tokenize(max_len=20)",
        "batch_size": 8,
        "shuffle_buffer": 16,
        "seed": 0,
        "prefetch": 1,
    }
    block.update(overrides)
    return block
