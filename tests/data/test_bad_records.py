"""Bad records are skipped and counted per reason; a source with no good record is an error."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tensorflow as tf

from data.pipeline import NoValidRecordsError, make_local_iterator
from data.records import BAD_RECORD_REASONS, bad_record_reason, texts_pass_checks
from data.tfrecords import encode_example
from tests.data.helpers import encode_image, labelled_image, tfrecord_config

PP = "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)"


def example_with(features: dict) -> bytes:
    feature = {}
    for key, value in features.items():
        if isinstance(value, int):
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def good(i: int) -> bytes:
    return encode_example(encode_image(labelled_image(i)), f"good {i}")


def write(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return str(path)


BAD = [
    (encode_example(b"\x00garbage bytes", "corrupt image"), "undecodable"),
    (encode_example(encode_image(labelled_image(1))[:40], "truncated png"), "undecodable"),
    (encode_example(encode_image(labelled_image(2), "JPEG")[:60], "truncated jpeg"), "undecodable"),
    (b"this is not a tf.train.Example", "undecodable"),
    (encode_example(b"", "zero-size image"), "empty_image"),
    (encode_example(encode_image(labelled_image(3)), ""), "empty_text"),
    (encode_example(encode_image(labelled_image(4)), "  \t "), "empty_text"),
    (encode_example(encode_image(labelled_image(5)), "x" * 65), "text_too_long"),
    (encode_example(encode_image(labelled_image(6)), b"caf\xe9 \xff"), "text_not_utf8"),
    (example_with({"caption": b"no image"}), "missing_field"),
    (example_with({"image": encode_image(labelled_image(7))}), "missing_field"),
]


def expected_counts(multiplier: int = 1) -> dict[str, int]:
    counts = dict.fromkeys(BAD_RECORD_REASONS, 0)
    for _, reason in BAD:
        counts[reason] += multiplier
    return counts


@pytest.fixture
def mixed_file(tmp_path):
    # Bad records between good ones; the last record is good so every bad one gets counted.
    records = (
        [good(100)]
        + [r for r, _ in BAD[:6]]
        + [good(101), good(102)]
        + [r for r, _ in BAD[6:]]
        + [good(103 + i) for i in range(5)]
    )
    return write(tmp_path / "mixed.tfrecord", records)


def test_bad_records_are_skipped_and_counted_per_reason(mixed_file):
    config = tfrecord_config(mixed_file, pp=PP, num_epochs=1, max_text_bytes=64)
    iterator = make_local_iterator(config, 0, 1)
    batches = list(iterator)
    assert len(batches) == 2
    indices = sorted(int(v) for b in batches for v in b["image"][:, 0, 0, 0])
    assert indices == list(range(100, 108))
    assert iterator.skipped() == expected_counts()


def test_counts_accumulate_over_epochs(mixed_file):
    config = tfrecord_config(mixed_file, pp=PP, max_text_bytes=64)
    iterator = make_local_iterator(config, 0, 1)
    for _ in range(4):
        next(iterator)
    assert iterator.skipped() == expected_counts(multiplier=2)


def test_a_source_without_good_records_is_an_error_not_a_hang(tmp_path):
    path = write(tmp_path / "bad.tfrecord", [r for r, _ in BAD])
    start = time.monotonic()
    with pytest.raises(NoValidRecordsError) as error:
        make_local_iterator(tfrecord_config(path, pp=PP, max_text_bytes=64), 0, 1)
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "no valid record" in message and "11 records" in message
    assert "'undecodable': 4" in message and "'empty_text': 2" in message


def test_preprocessing_that_fails_everywhere_reports_the_first_error(tmp_path):
    path = write(tmp_path / "good.tfrecord", [good(i) for i in range(4)])
    with pytest.raises(NoValidRecordsError, match="first preprocessing error"):
        make_local_iterator(tfrecord_config(path, pp="decode|central_crop(64)|" + PP[7:]), 0, 1)


def test_a_truncated_shard_does_not_stop_the_run(tmp_path):
    whole = write(tmp_path / "a.tfrecord", [good(i) for i in range(8)])
    cut = tmp_path / "b.tfrecord"
    write(cut, [good(50 + i) for i in range(8)])
    cut.write_bytes(cut.read_bytes()[:-30])  # the last record of b is cut short
    config = tfrecord_config(f"{whole},{cut}", pp=PP, num_epochs=1)
    iterator = make_local_iterator(config, 0, 1)
    indices = sorted(int(v) for b in iterator for v in b["image"][:, 0, 0, 0])
    assert set(indices) <= set(range(8)) | set(range(50, 57))
    # A finite pass keeps its last short batch: every one of the 15 readable records arrives.
    assert len(indices) == 15


def test_record_checks_directly():
    image = tf.constant(b"png")

    def reason(**record):
        code = int(bad_record_reason({"image": image, **record}, max_text_bytes=20))
        return "ok" if code == 0 else BAD_RECORD_REASONS[code - 1]

    assert reason(text=tf.constant("fine")) == "ok"
    assert reason(text=tf.constant("ünïcödé")) == "ok"
    assert reason(text=tf.constant("x" * 20)) == "ok"
    assert reason(text=tf.constant("x" * 21)) == "text_too_long"
    assert reason(text=tf.constant(b"\xc0\xaf")) == "text_not_utf8"
    assert reason(text=tf.constant(""), _missing=tf.constant(True)) == "missing_field"
    empty_pixels = {"image": tf.zeros([0, 5, 3], tf.uint8), "label": tf.constant(1)}
    assert BAD_RECORD_REASONS[int(bad_record_reason(empty_pixels, 10)) - 1] == "empty_image"
    # Pixels of static, non-empty shape cannot be empty: with no text, nothing is left to check.
    pixels = tf.constant(np.ones((2, 2, 1), np.uint8))
    assert bad_record_reason({"image": pixels}, 10) is None
    with_text = {"image": pixels, "text": tf.constant("")}
    assert bad_record_reason(with_text, 10, vetted_text=True) is None
    assert int(bad_record_reason(with_text, 10)) == 3  # empty_text
    # Pixels whose shape is known only at run time are checked then.
    checked = tf.function(lambda image: bad_record_reason({"image": image}, 10), autograph=False)
    dynamic = checked.get_concrete_function(tf.TensorSpec([None, None, 1], tf.uint8))
    assert int(dynamic(tf.zeros([0, 3, 1], tf.uint8))) == 2  # empty_image
    assert int(dynamic(pixels)) == 0


def test_a_text_set_passes_only_when_every_text_passes_each_check():
    assert texts_pass_checks(["fine", "ünïcödé", "x" * 20], max_text_bytes=20)
    assert not texts_pass_checks(["fine", " \t "], max_text_bytes=20)  # empty once stripped
    assert not texts_pass_checks(["fine", "é" * 11], max_text_bytes=20)  # 22 bytes
    assert not texts_pass_checks(["fine", ""], max_text_bytes=20)
