"""TFRecord shards of tf.train.Example {image: encoded bytes, caption: UTF-8 bytes, label: int64}.

Writing: `read_manifest` reads a CSV (header row naming the columns) or JSONL file of
(image path, caption) pairs, and `write_shards` stores the image files' bytes unchanged (no
re-encoding, so no quality loss) round-robin into N shards named PREFIX-00000-of-0000N.tfrecord.

Reading: TFRecordSource's shards are its files, read `cycle_length` at a time (data/order.py).
Each process reads whole files when there are at least as many files as processes (each host
reads only its own bytes; the order then depends on the process count), and otherwise every
process reads every file and keeps its rows of each global batch (the same order for any process
count). Records are parsed after the pipeline's shuffle, so a malformed proto is counted as an
undecodable record instead of stopping the run; the unreadable tail of a truncated file is
dropped.

All paths go through tf.io.gfile, so gs:// and other remote file systems work like local ones.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from data.records import MISSING
from data.source_base import ShardTable, Source

IMAGE_FEATURE = "image"
CAPTION_FEATURE = "caption"
LABEL_FEATURE = "label"


def encode_example(image: bytes, caption: str | bytes, label: int | None = None) -> bytes:
    """A serialized tf.train.Example with the features this module reads."""
    caption_bytes = caption.encode("utf-8") if isinstance(caption, str) else caption
    features = {
        IMAGE_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        CAPTION_FEATURE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption_bytes])),
    }
    if label is not None:
        features[LABEL_FEATURE] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _resolve(base_dir: str, path: str) -> str:
    """`path` relative to `base_dir` unless it is absolute or a URL (gs://...)."""
    if "://" in path or posixpath.isabs(path):
        return path
    joined = posixpath.join(base_dir, path)
    return joined if "://" in joined else posixpath.normpath(joined)


def read_manifest(
    path: str, image_column: str = "image", caption_column: str = "caption"
) -> list[tuple[str, str]]:
    """(image path, caption) pairs from a .csv (with header) or .jsonl file.

    Relative image paths are resolved against the manifest's directory, so a manifest and its
    images can move together.
    """
    path = str(path)
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {image_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)} in {reader.fieldnames}")
        rows = [(row[image_column], row[caption_column]) for row in reader]
    elif path.endswith((".jsonl", ".json")):
        rows = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if image_column not in item or caption_column not in item:
                raise ValueError(
                    f"{path}:{line_number}: needs keys {image_column!r} and {caption_column!r}"
                )
            rows.append((item[image_column], item[caption_column]))
    else:
        raise ValueError(f"{path}: manifest must be .csv or .jsonl")
    base_dir = posixpath.dirname(path)
    return [(_resolve(base_dir, image), caption) for image, caption in rows]


@dataclass
class WriteStats:
    """What write_shards did: files written, records per file, and inputs it could not read."""

    paths: list[str] = field(default_factory=list)
    records_per_shard: list[int] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)


def shard_paths(output_prefix: str, num_shards: int) -> list[str]:
    """PREFIX-00000-of-0000N.tfrecord, ..., the names write_shards uses."""
    return [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def write_shards(
    pairs: Iterable[tuple[str, str]], output_prefix: str, num_shards: int
) -> WriteStats:
    """Writes (image path, caption) pairs round-robin into num_shards TFRecord files.

    Unreadable image files are skipped and listed in the returned stats rather than aborting a
    long conversion.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    stats = WriteStats(
        paths=shard_paths(output_prefix, num_shards), records_per_shard=[0] * num_shards
    )
    tf.io.gfile.makedirs(posixpath.dirname(stats.paths[0]) or ".")
    writers = [tf.io.TFRecordWriter(p) for p in stats.paths]
    try:
        written = 0
        for image_path, caption in pairs:
            try:
                with tf.io.gfile.GFile(image_path, "rb") as f:
                    image = f.read()
            except (OSError, tf.errors.OpError):
                stats.unreadable_images.append(image_path)
                continue
            writers[written % num_shards].write(encode_example(image, caption))
            stats.records_per_shard[written % num_shards] += 1
            written += 1
    finally:
        for writer in writers:
            writer.close()
    return stats


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Glob patterns (one string, comma separated, or a list) -> sorted unique file names."""
    patterns = files.split(",") if isinstance(files, str) else list(files)
    found = sorted({name for pattern in patterns for name in tf.io.gfile.glob(pattern.strip())})
    if not found:
        raise FileNotFoundError(f"no TFRecord files match {patterns}")
    return found


def parse_example(
    serialized: tf.Tensor, image_key: str, text_key: str, label_key: str | None
) -> dict[str, tf.Tensor]:
    """string [] tf.train.Example -> raw record (data/records.py); absent features set _missing.

    Variable-length features tell "absent" (0 values) from "present but empty" (1 empty value),
    which a fixed-length feature with a default cannot.
    """
    spec = {image_key: tf.io.VarLenFeature(tf.string), text_key: tf.io.VarLenFeature(tf.string)}
    if label_key is not None:
        spec[label_key] = tf.io.VarLenFeature(tf.int64)
    parsed = tf.io.parse_single_example(serialized, spec)
    image = parsed[image_key].values
    text = parsed[text_key].values
    missing = tf.logical_or(tf.equal(tf.size(image), 0), tf.equal(tf.size(text), 0))
    record = {
        "image": tf.concat([image, [""]], 0)[0],
        "text": tf.concat([text, [""]], 0)[0],
    }
    if label_key is not None:
        label = parsed[label_key].values
        missing = tf.logical_or(missing, tf.equal(tf.size(label), 0))
        record["label"] = tf.cast(tf.concat([label, [0]], 0)[0], tf.int32)
    record[MISSING] = missing
    return record


class TFRecordSource(Source):
    """Image-caption TFRecord shards (as written by scripts.make_tfrecords).

    Args:
      files: glob pattern(s): one string (comma separated allowed) or a list; local or remote
        (gs://...) paths.
      image_key, text_key: feature names of the encoded image and the caption.
      label_key: optional int64 label feature (records without it count as missing_field).
      cycle_length: files read concurrently by one process (interleaved record by record); a
        resume re-reads at most this many files.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        image_key: str = IMAGE_FEATURE,
        text_key: str = CAPTION_FEATURE,
        label_key: str | None = None,
        cycle_length: int = 16,
    ) -> None:
        if cycle_length < 1:
            raise ValueError(f"cycle_length must be >= 1, got {cycle_length}")
        self.files = expand_files(files)
        self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
        self.group_size = cycle_length

    def shards(self) -> ShardTable:
        return {"file": np.asarray(self.files)}

    def read(self, shards: dict[str, tf.Tensor]) -> tf.data.Dataset:
        """Serialized protos of the files, one record from each in turn; parse() turns them into
        raw records."""
        return tf.data.Dataset.from_tensor_slices(shards["file"]).interleave(
            # A truncated file ends at its last whole record instead of failing the group.
            lambda file: tf.data.TFRecordDataset(file).ignore_errors(),
            cycle_length=self.group_size,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def parse(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return parse_example(serialized, self.image_key, self.text_key, self.label_key)

    def describe(self) -> str:
        return f"tfrecord({len(self.files)} files, first {self.files[0]})"
