"""Skipped-record counts are exact at the end of a finite pass, bad records after the last good
one included, for one process, several epochs, several processes and the global iterator."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
import tensorflow as tf

from data.fashion_mnist import FashionMnistSource
from data.pipeline import make_global_iterator, make_local_iterator
from data.records import BAD_RECORD_REASONS
from data.sources import SOURCES
from data.tfrecords import encode_example
from tests.data.helpers import (
    encode_image,
    fashion_config,
    labelled_image,
    make_fashion_dir,
    tfrecord_config,
    write_records,
)

# Decoded pixel (0, 0) keeps the record index: no crop, no flip, 8 px stays 8 px.
INDEX_PP = "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)"
MAX_TEXT_BYTES = 32


def example_with(features: dict[str, bytes]) -> bytes:
    """A tf.train.Example holding only the given bytes features."""
    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        for key, value in features.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def good(i: int) -> bytes:
    return encode_example(encode_image(labelled_image(i)), f"caption {i}")


def bad(kind: str, i: int) -> bytes:
    """A record with exactly one fault of `kind` (the reason the pipeline should give)."""
    image = encode_image(labelled_image(i))
    if kind == "undecodable":
        # Alternate between an image cut short and bytes that are no image at all.
        payload = image[: len(image) // 2] if i % 2 else b"<html>not found</html>"
        return encode_example(payload, f"caption {i}")
    if kind == "empty_image":
        return encode_example(b"", f"caption {i}")
    if kind == "empty_text":
        return encode_example(image, "")
    if kind == "text_too_long":
        return encode_example(image, "y" * (MAX_TEXT_BYTES + 1 + i))
    if kind == "text_not_utf8":
        return encode_example(image, b"caf\xe9 " + bytes([0xFF - i % 8]))
    if kind == "missing_field":
        return example_with({"image": image})
    raise ValueError(kind)


# Every reason, undecodable twice and last: records lost to errors leave no element behind.
TRAILING_KINDS = [*BAD_RECORD_REASONS[:-1], "undecodable", "undecodable"]


def counts_of(kinds: list[str], times: int = 1) -> dict[str, int]:
    """Expected per-reason counts, from the list of faults the test wrote."""
    tally = collections.Counter(kinds)
    return {reason: tally[reason] * times for reason in BAD_RECORD_REASONS}


def write_good_then_bad(path, num_good: int, kinds: list[str]) -> str:
    records = [good(i) for i in range(num_good)]
    records += [bad(kind, 100 + j) for j, kind in enumerate(kinds)]
    return write_records(path, records)


def config_for(files: str, **overrides) -> dict:
    block = tfrecord_config(files, pp=INDEX_PP, max_text_bytes=MAX_TEXT_BYTES, num_epochs=1)
    block.update(overrides)
    return block


def indices(batches) -> list[int]:
    return sorted(int(v) for b in batches for v in np.asarray(b["image"])[:, 0, 0, 0])


@pytest.mark.parametrize("num_good", [6, 8])  # last batch short / last batch full
def test_bad_records_after_the_last_good_one_are_counted(tmp_path, num_good):
    files = write_good_then_bad(tmp_path / "a.tfrecord", num_good, TRAILING_KINDS)
    iterator = make_local_iterator(config_for(files), 0, 1)
    batches = list(iterator)
    assert indices(batches) == list(range(num_good))
    assert len(batches) == -(-num_good // 4)  # no empty batch is handed out
    assert iterator.skipped() == counts_of(TRAILING_KINDS)
    # Exhausted iterators stay exhausted, with the same counts.
    assert list(iterator) == []
    assert iterator.skipped() == counts_of(TRAILING_KINDS)


def test_a_pass_of_only_trailing_undecodable_records_after_shuffling(tmp_path):
    kinds = ["undecodable"] * 5
    files = write_good_then_bad(tmp_path / "a.tfrecord", 9, kinds)
    # Windows of 3 records: the last two windows hold only records that fail to decode.
    iterator = make_local_iterator(config_for(files, shuffle_buffer=3), 0, 1)
    assert indices(iterator) == list(range(9))
    assert iterator.skipped() == counts_of(kinds)


def test_every_epoch_of_a_finite_pass_is_counted(tmp_path):
    files = write_good_then_bad(tmp_path / "a.tfrecord", 5, TRAILING_KINDS)
    iterator = make_local_iterator(config_for(files, num_epochs=3, shuffle_buffer=4), 0, 1)
    assert indices(iterator) == sorted(list(range(5)) * 3)
    assert iterator.skipped() == counts_of(TRAILING_KINDS, times=3)


def test_the_state_at_the_end_keeps_the_final_counts(tmp_path):
    files = write_good_then_bad(tmp_path / "a.tfrecord", 8, TRAILING_KINDS)
    config = config_for(files, shuffle_buffer=5)
    iterator = make_local_iterator(config, 0, 1)
    list(iterator)
    resumed = make_local_iterator(config, 0, 1)
    resumed.set_state(iterator.get_state())
    assert resumed.skipped() == counts_of(TRAILING_KINDS)
    assert list(resumed) == []
    assert resumed.skipped() == counts_of(TRAILING_KINDS)


def test_a_state_at_the_end_of_one_epoch_continues_into_the_next(tmp_path):
    files = write_good_then_bad(tmp_path / "a.tfrecord", 8, ["empty_text", "undecodable"])
    once = make_local_iterator(config_for(files, shuffle_buffer=5), 0, 1)
    list(once)
    forever = config_for(files, shuffle_buffer=5, num_epochs=None)
    reference = make_local_iterator(forever, 0, 1)
    expected = [next(reference) for _ in range(4)]  # epoch 1 is batches 2 and 3
    continued = make_local_iterator(forever, 0, 1)
    continued.set_state(once.get_state())
    for want in expected[2:]:
        got = next(continued)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], key)


@pytest.mark.parametrize("num_files", [1, 2])  # example-level / file-level sharding
def test_processes_counts_add_up_to_the_whole_pass(tmp_path, num_files):
    kinds_per_file = [TRAILING_KINDS, ["empty_text", "undecodable", "undecodable"]][:num_files]
    files = ",".join(
        write_good_then_bad(tmp_path / f"f{k}.tfrecord", 8, kinds)
        for k, kinds in enumerate(kinds_per_file)
    )
    config = config_for(files, batch_size=4, shuffle_buffer=3)
    total = collections.Counter()
    seen = []
    for process in range(2):
        iterator = make_local_iterator(config, process, 2)
        seen += indices(iterator)
        total.update(iterator.skipped())
    assert sorted(seen) == sorted(list(range(8)) * num_files)
    assert dict(total) == counts_of([k for kinds in kinds_per_file for k in kinds])


@pytest.mark.parametrize("device_prefetch", [0, 2])
def test_the_global_iterator_has_the_final_counts_once_exhausted(tmp_path, device_prefetch):
    files = write_good_then_bad(tmp_path / "a.tfrecord", 16, TRAILING_KINDS)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    config = config_for(files, batch_size=8)
    iterator = make_global_iterator(config, mesh, device_prefetch=device_prefetch)
    batches = []
    for batch in iterator:
        batches.append(batch)
        # Counts describe the batches returned: the trailing bad records come after them.
        assert sum(iterator.skipped().values()) == 0
    assert indices(batches) == list(range(16))
    assert iterator.skipped() == counts_of(TRAILING_KINDS)


# Sources whose records no check can fail (decoded pixels of static shape, captions from a vetted
# bank) run no per-record check, scan or filter: their skipped records are the gaps counted once
# per batch.
LOST = (3, 17, 38, 39)  # two of them at the end of the split
FASHION_PP = "decode|resize(28)|value_range(-1, 1)|tokenize(max_len=8)"


class FashionWithLostRecords(FashionMnistSource):
    """Fake Fashion-MNIST whose examples in LOST fail to parse, as corrupt records would."""

    def parse(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        record = dict(element)
        index = tf.cast(record["image"][0, 0, 0], tf.int64)  # make_fashion_dir's index pixel
        lost = tf.reduce_any(tf.equal(index, tf.constant(LOST, tf.int64)))
        with tf.control_dependencies([tf.debugging.assert_equal(lost, False, "lost record")]):
            record["image"] = tf.identity(record["image"])
        return record


@pytest.fixture
def lost_records_config(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES._factories, "fashion_with_lost_records", FashionWithLostRecords)
    make_fashion_dir(tmp_path, n_train=40)

    def config(**overrides) -> dict:
        block = fashion_config(tmp_path, pp=FASHION_PP, num_epochs=1, shuffle_buffer=7)
        block["source"]["name"] = "fashion_with_lost_records"
        block.update(overrides)
        return block

    return config


def pixel_indices(batches) -> list[int]:
    # The op string keeps uint8 pixels as [-1, 1] floats: 255 * (v + 1) / 2 is the index.
    return sorted(round(127.5 * (float(v) + 1)) for b in batches for v in b["image"][:, 0, 0, 0])


def test_records_that_no_check_can_fail_are_not_checked_yet_lost_ones_are_counted(
    lost_records_config, tmp_path
):
    iterator = make_local_iterator(lost_records_config(num_epochs=3), 0, 1)
    assert not iterator.checks_records
    kept = [i for i in range(40) if i not in LOST]
    assert pixel_indices(iterator) == sorted(kept * 3)
    assert iterator.skipped() == counts_of(["undecodable"] * len(LOST), times=3)
    files = write_good_then_bad(tmp_path / "a.tfrecord", 4, ["empty_text"])
    # Encoded images may be empty, captions may be anything: those records are checked.
    assert make_local_iterator(config_for(files), 0, 1).checks_records


def test_a_resumed_unchecked_stream_continues_with_the_same_batches_and_counts(
    lost_records_config,
):
    config = lost_records_config(num_epochs=2)
    whole = list(make_local_iterator(config, 0, 1))
    reference = make_local_iterator(config, 0, 1)
    first = [next(reference) for _ in range(4)]
    resumed = make_local_iterator(config, 0, 1)
    resumed.set_state(reference.get_state())
    rest = list(resumed)
    assert len(first) + len(rest) == len(whole)
    for got, want in zip(first + rest, whole, strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
    assert resumed.skipped() == counts_of(["undecodable"] * len(LOST), times=2)


def test_unchecked_counts_of_processes_add_up_to_the_whole_pass(lost_records_config):
    total = collections.Counter()
    seen = []
    for process in range(2):
        iterator = make_local_iterator(lost_records_config(), process, 2)
        seen += pixel_indices(iterator)
        total.update(iterator.skipped())
    assert sorted(seen) == [i for i in range(40) if i not in LOST]
    assert dict(total) == counts_of(["undecodable"] * len(LOST))
