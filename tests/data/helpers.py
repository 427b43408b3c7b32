"""Small data written by the tests themselves (IDX files, images, TFRecord shards, configs) and
the checks several test files share (same batches, exact resume).

Images are encoded with Pillow and IDX files with struct, independently of the code under test.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from data.pipeline import make_local_iterator
from data.tfrecords import encode_example


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


def write_records(path: Path | str, records: list[bytes]) -> str:
    """Writes serialized records into one TFRecord file (any tf.io.gfile path); returns its name."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def take(iterator: Any, n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Same number of batches, same keys, bit-identical values."""
    assert len(a) == len(b)
    for index, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), index
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), f"{index} {key}")


def good_record(i: int) -> bytes:
    """A tf.train.Example of labelled_image(i) with the caption 'caption i'."""
    return encode_example(encode_image(labelled_image(i)), f"caption {i}")


BAD_RECORDS = [
    encode_example(b"\x00garbage bytes", "corrupt image"),
    encode_example(encode_image(labelled_image(1)), ""),
    b"this is not a tf.train.Example",
]


def write_files(folder: Path, num_files: int, per_file: int, bad_every: int = 0) -> str:
    """num_files files pairs-K.tfrecord; file k holds good records k, k + num_files, ...; with
    bad_every, a bad one (cycling through BAD_RECORDS) follows each multiple of bad_every."""
    bad = 0
    for k in range(num_files):
        records = []
        for i in range(k, num_files * per_file, num_files):
            records.append(good_record(i))
            if bad_every and i % bad_every == 0:
                records.append(BAD_RECORDS[bad % len(BAD_RECORDS)])
                bad += 1
        write_records(folder / f"pairs-{k}.tfrecord", records)
    return str(folder / "pairs-*.tfrecord")


def run(config: dict[str, Any], process: int, processes: int, num_batches: int):
    """(batches, state after each batch, skipped counts after each batch); states[0] is the
    state before the first batch."""
    iterator = make_local_iterator(config, process, processes)
    batches, states, skipped = [], [iterator.get_state()], [iterator.skipped()]
    for _ in range(num_batches):
        batches.append(next(iterator))
        states.append(iterator.get_state())
        skipped.append(iterator.skipped())
    return batches, states, skipped


def check_resumes(
    config: dict[str, Any], process: int, processes: int, num_batches: int, resume_after: list[int]
) -> list[np.ndarray]:
    """Restoring the state after batch k gives batches k+1... and skipped counts as the
    uninterrupted run."""
    batches, states, skipped = run(config, process, processes, num_batches)
    resumed = make_local_iterator(config, process, processes)
    for k in resume_after:
        # A restore overrides wherever the iterator was, including an earlier restore.
        resumed.set_state(states[k])
        assert resumed.skipped() == skipped[k]
        for j in range(k, num_batches):
            assert_same_batches([next(resumed)], [batches[j]])
            assert resumed.skipped() == skipped[j + 1], (k, j)
    return states


def concatenated(iterators: list[Any], num_batches: int) -> list[dict[str, np.ndarray]]:
    """The next num_batches batches of each process's iterator, rows concatenated in process
    order: the global batches."""
    out = []
    for _ in range(num_batches):
        parts = [next(it) for it in iterators]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out
