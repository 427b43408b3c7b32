"""Tokenize ops moved after batching: which ones move, and that nothing changes when they do."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data.batch_tokenize import split_batch_tokenize
from data.pipeline import make_local_iterator
from data.preprocess import parse_pp
from data.tfrecords import encode_example
from tests.data.helpers import (
    encode_image,
    fashion_config,
    make_fashion_dir,
    take,
    tfrecord_config,
    write_records,
)

CAPTIONS = [
    "a photo of a shoe",
    "",
    "Ünïcode naïve café, with accents",
    "a very long caption " * 10,
    "x",
]


def op_names(pp_fn):
    return [name for name, _, _ in pp_fn.ops]


@pytest.mark.parametrize(
    "pp, per_record, per_batch",
    [
        (
            "decode|resize(32)|flip_lr|value_range(-1, 1)|tokenize(max_len=20)",
            ["decode", "resize", "flip_lr", "value_range"],
            ["tokenize"],
        ),
        # Image ops after it commute with it.
        ("decode|tokenize(8)|resize(32)|to_uint8", ["decode", "resize", "to_uint8"], ["tokenize"]),
        (
            "tokenize(8)|decode|tokenize(4, key='other', out_key='other_ids')",
            ["decode"],
            ["tokenize", "tokenize"],
        ),
        # Ops that see every key, or the text key itself, keep it per record.
        ("decode|tokenize(8)|keep('image', 'text')", ["decode", "tokenize", "keep"], None),
        (
            "decode|tokenize(8, out_key='ids')|drop('text')",
            ["decode", "tokenize", "drop"],
            None,
        ),
        ("tokenize(8)|to_uint8(key='text')", ["tokenize", "to_uint8"], None),
        # Only the tokenize ops after the last blocking op move.
        (
            "tokenize(8)|keep('image', 'text', 'other')|decode|tokenize(4, key='other')",
            ["tokenize", "keep", "decode"],
            ["tokenize"],
        ),
        ("decode|resize(32)", ["decode", "resize"], None),
    ],
)
def test_which_tokenize_ops_move_after_batching(pp, per_record, per_batch):
    record_fn, batch_fn = split_batch_tokenize(parse_pp(pp))
    assert op_names(record_fn) == per_record
    assert (op_names(batch_fn) if batch_fn else None) == per_batch


@pytest.mark.parametrize("max_len", [3, 8, 20])
def test_a_tokenized_batch_is_the_records_tokenized_one_by_one(max_len):
    pp_fn = parse_pp(f"tokenize(max_len={max_len})")
    _, batch_fn = split_batch_tokenize(pp_fn)
    one_by_one = [pp_fn({"text": tf.constant(c)})["text"].numpy() for c in CAPTIONS]
    batched = batch_fn({"text": tf.constant(CAPTIONS)})["text"].numpy()
    assert batched.shape == (len(CAPTIONS), max_len)
    np.testing.assert_array_equal(batched, np.stack(one_by_one))
    empty = batch_fn({"text": tf.constant([], tf.string)})["text"]
    assert empty.shape == (0, max_len)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def per_record_twin(config):
    """The same input with a final keep() of every output key: it changes no value but keeps the
    tokenize op per record, the reference the batched path must match."""
    moved = make_local_iterator(config, 0, 1)
    assert moved.batch_pp_fn is not None
    keys = sorted(next(iter(make_local_iterator(config, 0, 1))))
    reference = make_local_iterator({**config, "pp": f"{config['pp']}|keep{tuple(keys)!r}"}, 0, 1)
    assert reference.batch_pp_fn is None
    return moved, reference


def test_training_batches_are_unchanged_by_batched_tokenizing(tmp_path):
    make_fashion_dir(tmp_path, n_train=40, n_test=8)
    moved, reference = per_record_twin(fashion_config(tmp_path))
    assert_same_batches(take(moved, 12), take(reference, 12))
    assert moved.get_state().tobytes() != b""


def test_a_finite_pass_with_bad_records_is_unchanged_by_batched_tokenizing(tmp_path):
    good = [
        encode_example(encode_image(np.full((4, 4, 3), i, np.uint8)), caption)
        for i, caption in enumerate(["c 0", "Ünïcode café", "a longer caption " * 5, "d"])
    ]
    bad_utf8 = encode_example(encode_image(np.zeros((4, 4, 3), np.uint8)), b"\xff\xfe bytes")
    files = write_records(tmp_path / "pairs.tfrecord", [good[0], bad_utf8, *good[1:], b"junk"])
    config = tfrecord_config(files, num_epochs=1, batch_size=3, shuffle_buffer=0)
    moved, reference = per_record_twin(config)
    batches = list(moved)
    assert [len(b["text"]) for b in batches] == [3, 1]
    assert_same_batches(batches, list(reference))
    assert moved.skipped() == reference.skipped()
    assert moved.skipped()["text_not_utf8"] == 1 and moved.skipped()["missing_field"] == 1
