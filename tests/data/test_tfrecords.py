"""Manifests -> TFRecord shards -> per-process records and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from data.convert import write_shards
from data.pipeline import make_local_iterator
from data.tfrecords import (
    ShardWriter,
    TFRecordSource,
    encode_example,
    read_manifest,
)
from tests.data.helpers import encode_image, labelled_image, tfrecord_config

INDEX_PP = "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)"


def make_images(root, n):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(encode_image(labelled_image(i)))
    return [(f"img/{i}.png", f"caption number {i}") for i in range(n)]


def parse_plain(path):
    """Reads a shard with tf.train.Example, independently of data.tfrecords' parser."""
    out = []
    for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(raw)
        features = example.features.feature
        out.append(
            (
                features["image"].bytes_list.value[0],
                features["caption"].bytes_list.value[0].decode(),
            )
        )
    return out


def test_read_manifest_csv_tsv_jsonl_resolve_relative_paths_and_leave_out_bad_rows(tmp_path):
    pairs = make_images(tmp_path, 3)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "image,caption\n" + "".join(f'{p},"{c}, ok"\n' for p, c in pairs) + "img/0.png,\n"
    )
    tsv_path = tmp_path / "pairs.tsv"
    tsv_path.write_text("caption\timage\n" + "".join(f"{c}\t{p}\n" for p, c in pairs))
    jsonl_path = tmp_path / "pairs.jsonl"
    jsonl_path.write_text(
        "".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in pairs) + "{broken\n"
    )
    expected = [(str(tmp_path / p), c) for p, c in pairs]
    assert read_manifest(csv_path) == [(p, c + ", ok") for p, c in expected]
    assert read_manifest(tsv_path) == expected
    assert read_manifest(jsonl_path) == expected
    with pytest.raises(ValueError, match="caption"):
        read_manifest(csv_path, caption_column="text")


def test_shard_writer_publishes_complete_shards_only(tmp_path):
    prefix = str(tmp_path / "out" / "pairs")
    with ShardWriter(prefix, num_shards=2) as writer:
        for i in range(3):
            writer.write(encode_example(b"image", f"caption {i}"))
        assert not tf.io.gfile.glob(f"{prefix}-*.tfrecord")  # still under temporary names
        assert len(tf.io.gfile.glob(f"{prefix}-*.tfrecord.tmp-*")) == 2
    assert writer.records_per_shard == [2, 1]
    assert sorted(tf.io.gfile.listdir(str(tmp_path / "out"))) == [
        "pairs-00000-of-00002.tfrecord",
        "pairs-00001-of-00002.tfrecord",
    ]
    assert [c for _, c in parse_plain(writer.paths[0])] == ["caption 0", "caption 2"]

    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "failed" / "pairs"), 2) as writer:
        writer.write(encode_example(b"image", "caption"))
        raise RuntimeError("interrupted")
    assert tf.io.gfile.listdir(str(tmp_path / "failed")) == []


def test_write_shards_round_robin_keeps_bytes_and_lists_unreadable(tmp_path):
    pairs = [(str(tmp_path / p), c) for p, c in make_images(tmp_path, 7)]
    pairs.insert(2, (str(tmp_path / "img" / "missing.png"), "lost"))
    stats = write_shards(pairs, tmp_path / "out" / "pairs", num_shards=3)
    assert [p.split("/")[-1] for p in stats.paths] == [
        f"pairs-0000{i}-of-00003.tfrecord" for i in range(3)
    ]
    assert stats.records_per_shard == [3, 2, 2]
    assert stats.unreadable_images == [str(tmp_path / "img" / "missing.png")]
    read = [parse_plain(p) for p in stats.paths]
    assert [c for c in (r[1] for r in read[0])] == [
        "caption number 0",
        "caption number 3",
        "caption number 6",
    ]
    assert read[1][0][0] == (tmp_path / "img" / "1.png").read_bytes()


def write_dataset(tmp_path, n, num_shards):
    pairs = [(str(tmp_path / p), c) for p, c in make_images(tmp_path, n)]
    write_shards(pairs, tmp_path / "out" / "pairs", num_shards)
    return str(tmp_path / "out" / "pairs-*.tfrecord")


@pytest.mark.parametrize("num_shards", [4, 1])
def test_processes_read_disjoint_records_covering_the_source(tmp_path, num_shards):
    files = write_dataset(tmp_path, 12, num_shards)
    source = TFRecordSource(files)
    seen = []
    for process in range(2):
        captions = [
            source.parse(r)["text"].numpy().decode() for r in source.records(process, 2, seed=5)
        ]
        assert len(captions) == 6
        seen += captions
    assert sorted(seen) == sorted(f"caption number {i}" for i in range(12))


def test_batches_decode_the_stored_images(tmp_path):
    files = write_dataset(tmp_path, 12, 3)
    iterator = make_local_iterator(tfrecord_config(files, pp=INDEX_PP, shuffle_buffer=12), 0, 1)
    indices = []
    for _ in range(3):
        batch = next(iterator)
        assert batch["image"].shape == (4, 8, 8, 3) and batch["text"].shape == (4, 8)
        red = batch["image"][..., 0]
        assert (red == red[:, :1, :1]).all()
        indices += red[:, 0, 0].astype(int).tolist()
        np.testing.assert_allclose(batch["image"][0, 0, :, 1], np.arange(8) * 10)
    assert sorted(indices) == list(range(12))  # one epoch = every record once


def test_no_matching_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecord files"):
        TFRecordSource(str(tmp_path / "nothing-*.tfrecord"))
