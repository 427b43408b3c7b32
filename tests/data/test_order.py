"""The replayable order: exact resume for every source kind (mid-window, at a group boundary,
across epochs, with bad records), layout-independent batches under example-level sharding,
resume from another process count, and a state that stays small."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from data.order import InputPosition, decode_state, encode_state
from data.pipeline import make_local_iterator
from tests.data.helpers import (
    assert_same_batches,
    check_resumes,
    concatenated,
    fashion_config,
    make_fashion_dir,
    run,
    take,
    tfrecord_config,
    write_files,
)

# Random ops, so that exact resume also covers the augmentation seeds.
RANDOM_PP = "decode|inception_crop(6)|flip_lr|value_range(0, 255)|tokenize(max_len=8)"
# Decoded pixel (0, 0) keeps the record index: no crop, no flip, 8 px stays 8 px.
INDEX_PP = "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)"


def positions(state: np.ndarray) -> dict:
    return decode_state(state)[1].__dict__


def test_tfrecord_file_sharding_resumes_exactly(tmp_path):
    # 4 files x 6 records, 2 files per group (12 records), windows of 5, 5, 2, batches of 4.
    files = write_files(tmp_path, 4, 6)
    config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=5, batch_size=4)
    config["source"]["cycle_length"] = 2
    states = check_resumes(config, 0, 1, 14, resume_after=[1, 3, 6, 8])
    assert positions(states[1]) == dict(
        epoch=0, group=0, window=0, index=3, position=3, next_position=4
    )  # mid-window
    assert positions(states[3])["position"] == 11  # last record of group 0
    assert (positions(states[3])["window"], positions(states[3])["index"]) == (2, 1)
    assert positions(states[6])["position"] == 23 and positions(states[6])["epoch"] == 0
    assert positions(states[8])["epoch"] == 1


def test_tfrecord_resume_with_bad_records_keeps_the_skipped_counts(tmp_path):
    files = write_files(tmp_path, 4, 6, bad_every=3)
    config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=5, batch_size=4)
    config["source"]["cycle_length"] = 2
    _, _, skipped = run(config, 0, 1, 12)
    assert sum(skipped[-1].values()) > 0
    check_resumes(config, 0, 1, 12, resume_after=[1, 3, 4, 7])


def test_tfrecord_example_sharding_resumes_exactly(tmp_path):
    # One file for two processes: both read it, each keeps its rows of every global batch
    # (process 1: rows 4..7).
    files = write_files(tmp_path, 1, 24, bad_every=5)
    config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=5, batch_size=8)
    check_resumes(config, 1, 2, 7, resume_after=[1, 3, 5])


def test_fashion_mnist_resumes_exactly(tmp_path):
    make_fashion_dir(tmp_path, n_train=40)
    config = fashion_config(tmp_path)  # windows of 16 over one 40-example group per epoch
    states = check_resumes(config, 0, 1, 10, resume_after=[1, 2, 5, 7])
    assert (positions(states[2])["window"], positions(states[2])["index"]) == (0, 15)
    assert positions(states[5])["position"] == 39 and positions(states[5])["epoch"] == 0


def test_a_restore_does_not_replay_the_stream(tmp_path):
    make_fashion_dir(tmp_path, n_train=40)
    config = fashion_config(tmp_path)
    iterator = make_local_iterator(config, 0, 1)
    next(iterator)
    layout, _, skipped = decode_state(iterator.get_state())
    # Epoch 10**9, window 1, index 2: stream position 40 * 10**9 + 16 + 2. Replaying 4e10
    # records would take hours at any speed; seeking takes seconds even on a loaded machine.
    far = encode_state(
        layout, InputPosition(10**9, 0, 1, 2, 40 * 10**9 + 18, 40 * 10**9 + 19), skipped
    )
    start = time.monotonic()
    iterator.set_state(far)
    next(iterator)
    assert time.monotonic() - start < 300
    assert positions(iterator.get_state())["epoch"] == 10**9


def test_state_is_small_whatever_the_shuffle_buffer(tmp_path):
    files = write_files(tmp_path, 4, 6)
    for shuffle_buffer in (0, 5, 250_000):
        config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=shuffle_buffer)
        iterator = make_local_iterator(config, 0, 1)
        take(iterator, 3)
        state = iterator.get_state()
        assert state.dtype == np.uint8 and state.ndim == 1
        assert state.nbytes < 1024
        json.loads(state.tobytes())


def test_fashion_mnist_batches_do_not_depend_on_the_process_count(tmp_path):
    make_fashion_dir(tmp_path, n_train=40)
    config = fashion_config(tmp_path)  # random flips and sampled captions included
    single = take(make_local_iterator(config, 0, 1), 12)  # 5 batches per epoch
    pair = [make_local_iterator(config, p, 2) for p in range(2)]
    assert_same_batches(concatenated(pair, 12), single)


@pytest.mark.parametrize("num_files, processes", [(1, 2), (3, 4)])
def test_tfrecords_with_fewer_files_than_processes_do_not_depend_on_it(
    tmp_path, num_files, processes
):
    files = write_files(tmp_path, num_files, 12)
    config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=5, batch_size=8)
    config["source"]["cycle_length"] = 2
    per_epoch = num_files * 12 // 8
    single = take(make_local_iterator(config, 0, 1), per_epoch + 3)
    iterators = [make_local_iterator(config, p, processes) for p in range(processes)]
    assert_same_batches(concatenated(iterators, per_epoch + 3), single)


def test_resume_on_another_process_count_continues_the_global_batches(tmp_path):
    make_fashion_dir(tmp_path, n_train=40)
    config = fashion_config(tmp_path)
    single = take(make_local_iterator(config, 0, 1), 12)
    # Two processes stop after 3 batches; one process continues from process 0's state.
    pair = [make_local_iterator(config, p, 2) for p in range(2)]
    take(pair[0], 3), take(pair[1], 3)
    alone = make_local_iterator(config, 0, 1)
    alone.set_state(pair[0].get_state())
    assert_same_batches(take(alone, 6), single[3:9])
    # ... and two processes continue from that single process's state after batch 9.
    for iterator in pair:
        iterator.set_state(alone.get_state())
    assert_same_batches(concatenated(pair, 3), single[9:12])


def test_file_sharded_states_do_not_move_to_another_layout(tmp_path):
    files = write_files(tmp_path, 4, 6)
    config = tfrecord_config(files, pp=RANDOM_PP, shuffle_buffer=5)
    first = make_local_iterator(config, 0, 2)
    next(first)
    state = first.get_state()
    for process, processes in ((0, 1), (1, 2), (0, 4)):
        with pytest.raises(ValueError, match="file-level sharding.*resume with 2 processes"):
            make_local_iterator(config, process, processes).set_state(state)


def test_states_of_other_configs_or_versions_are_refused(tmp_path):
    make_fashion_dir(tmp_path, n_train=40)
    iterator = make_local_iterator(fashion_config(tmp_path), 0, 1)
    state = iterator.get_state()
    other = make_local_iterator(fashion_config(tmp_path, shuffle_buffer=8), 0, 1)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a state"):
        iterator.set_state(np.frombuffer(b"PK\x03\x04 an old zip archive", np.uint8))
    decoded = json.loads(state.tobytes())
    decoded["version"] = 1
    with pytest.raises(ValueError, match="version 1"):
        iterator.set_state(np.frombuffer(json.dumps(decoded).encode(), np.uint8))


def test_a_finite_pass_resumed_at_its_end_is_empty(tmp_path):
    files = write_files(tmp_path, 2, 6)
    config = tfrecord_config(files, pp=INDEX_PP, shuffle_buffer=4, num_epochs=1)
    iterator = make_local_iterator(config, 0, 1)
    seen = [int(v) for b in iterator for v in b["image"][:, 0, 0, 0]]
    assert sorted(seen) == list(range(12))
    resumed = make_local_iterator(config, 0, 1)
    resumed.set_state(iterator.get_state())
    assert list(resumed) == []
