"""TFRecord shards of tf.train.Example {image: encoded bytes, caption: UTF-8 bytes, label: int64}.

Writing: `ShardWriter` stores serialized examples round-robin into N shards named
PREFIX-00000-of-0000N.tfrecord and publishes them only when complete. scripts.make_tfrecords
(data/pair_readers.py, data/convert.py) fills it from manifests, image folders or WebDataset
tars; `read_manifest` (here) and `write_shards` (data/convert.py) are the small library form of
the same path for a CSV / TSV / JSONL manifest of (image path, caption), storing the image files'
bytes unchanged.

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

import os
import posixpath
from collections.abc import Sequence

import numpy as np

from data.lazy_tf import tf
from data.pair_readers import InputError, Row, RowError, clean_caption, detect_format, read_pairs
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


def read_manifest(
    path: str, image_column: str = "image", caption_column: str = "caption"
) -> list[tuple[str, str]]:
    """(image path, caption) of the usable rows of a .csv / .tsv (header row) or .jsonl file.

    Relative image paths are resolved against the manifest's directory, so a manifest and its
    images can move together. Rows that cannot be used are left out (scripts.make_tfrecords
    counts them); a header without the named columns raises InputError (a ValueError).
    """
    path = str(path)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no manifest {path}")
    input_format = detect_format(path)
    if input_format not in ("csv", "tsv", "jsonl"):
        raise InputError(f"{path}: a manifest is .csv, .tsv or .jsonl")
    pairs = []
    for row in read_pairs([(path, input_format)], image_column, caption_column):
        if isinstance(row, Row):
            try:
                pairs.append((row.image, clean_caption(row.caption)))
            except RowError:
                continue
    return pairs


def shard_paths(output_prefix: str, num_shards: int) -> list[str]:
    """PREFIX-00000-of-0000N.tfrecord, ..., the names ShardWriter publishes."""
    return [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


class ShardWriter:
    """Serialized examples, round-robin into PREFIX-0000i-of-0000N.tfrecord, published whole.

    Shards are written under temporary names (FINAL.tmp-PID), which a training glob such as
    PREFIX-*.tfrecord does not match, and renamed to their final names only once all of them are
    complete: a crash mid-write leaves no partial file under a final name. As a context manager
    it publishes on a normal exit and removes the temporary files on an exception.
    """

    def __init__(self, output_prefix: str, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.paths = shard_paths(str(output_prefix), num_shards)
        self.records_per_shard = [0] * num_shards
        self._temporary = [f"{path}.tmp-{os.getpid()}" for path in self.paths]
        tf.io.gfile.makedirs(posixpath.dirname(self.paths[0]) or ".")
        self._writers: list[tf.io.TFRecordWriter] = []
        self._finished = False
        try:
            for path in self._temporary:
                self._writers.append(tf.io.TFRecordWriter(path))
        except BaseException:
            self.discard()
            raise

    def write(self, serialized: bytes) -> None:
        shard = sum(self.records_per_shard) % len(self.paths)
        self._writers[shard].write(serialized)
        self.records_per_shard[shard] += 1

    def publish(self) -> None:
        """Closes every shard, then gives each its final name (replacing an older file)."""
        self._close()
        for temporary, path in zip(self._temporary, self.paths, strict=True):
            tf.io.gfile.rename(temporary, path, overwrite=True)

    def discard(self) -> None:
        """Closes and removes the temporary files; publishes nothing."""
        try:
            self._close()
        finally:
            for temporary in self._temporary:
                if tf.io.gfile.exists(temporary):
                    tf.io.gfile.remove(temporary)

    def _close(self) -> None:
        self._finished = True
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._finished:
            return
        if exc_type is None:
            self.publish()
        else:
            self.discard()


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
