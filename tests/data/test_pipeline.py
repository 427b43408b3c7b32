"""Determinism, exact resume, per-process shares and global arrays on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import PartitionSpec

from data.pipeline import (
    BatchContractError,
    make_global_iterator,
    make_local_iterator,
    per_process_batch_size,
)
from data.tfrecords import encode_example
from data.tokenizers import train_sentencepiece
from tests.data.helpers import (
    encode_image,
    fashion_config,
    make_fashion_dir,
    tfrecord_config,
    write_records,
)

# Decoded Fashion-MNIST keeps 28x28, so pixel (0, 0) still holds the example's index.
INDEX_PP = "decode|value_range(0, 255)|tokenize(max_len=20)"


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    make_fashion_dir(root, n_train=40, n_test=8)
    return root


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_order(fashion_dir):
    config = fashion_config(fashion_dir)
    first = take(make_local_iterator(config, 0, 1), 6)
    assert_same_batches(first, take(make_local_iterator(config, 0, 1), 6))
    other = take(make_local_iterator({**config, "seed": 1}, 0, 1), 6)
    assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_every_epoch_is_a_new_permutation_of_all_examples(fashion_dir):
    iterator = make_local_iterator(fashion_config(fashion_dir, pp=INDEX_PP), 0, 1)
    epochs = [
        np.concatenate([b["image"][:, 0, 0, 0] for b in take(iterator, 5)]).astype(int)
        for _ in range(2)
    ]
    for order in epochs:
        assert sorted(order) == list(range(40))
    assert epochs[0].tolist() != epochs[1].tolist()


def test_restored_iterator_continues_with_the_next_batch(fashion_dir):
    config = fashion_config(fashion_dir)
    reference = make_local_iterator(config, 0, 1)
    take(reference, 7)  # crosses the first epoch boundary (5 batches per epoch)
    state = reference.get_state()
    assert state.dtype == np.uint8 and state.ndim == 1
    expected = take(reference, 6)

    resumed = make_local_iterator(config, 0, 1)
    take(resumed, 2)  # a restore overrides wherever the new iterator was
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)


def test_a_rewound_iterator_starts_over_like_a_new_one(fashion_dir):
    config = fashion_config(fashion_dir)  # shuffled, with a random flip
    fresh = take(make_local_iterator(config, 0, 1), 7)
    iterator = make_local_iterator(config, 0, 1)
    take(iterator, 7)  # into the second epoch
    iterator.rewind()
    assert_same_batches(take(iterator, 7), fresh)
    # Restored elsewhere, then rewound: back to the first batch all the same.
    state = iterator.get_state()
    iterator.set_state(state)
    iterator.rewind()
    assert_same_batches(take(iterator, 7), fresh)


def test_a_finite_pass_rewinds_to_the_same_batches_and_counts_from_zero(tmp_path):
    bad = b"this is not a tf.train.Example"
    good = [
        encode_example(encode_image(np.full((4, 4, 3), i, np.uint8)), f"c {i}") for i in range(5)
    ]
    files = str(tmp_path / "pairs.tfrecord")
    write_records(files, [good[0], bad, *good[1:]])
    config = tfrecord_config(files, num_epochs=1, batch_size=2, shuffle_buffer=0)
    iterator = make_local_iterator(config, 0, 1)
    first = list(iterator)
    assert [len(b["image"]) for b in first] == [2, 2, 1]
    assert sum(iterator.skipped().values()) == 1
    iterator.rewind()
    assert sum(iterator.skipped().values()) == 0
    assert_same_batches(list(iterator), first)
    assert sum(iterator.skipped().values()) == 1


def test_no_dataset_function_goes_through_autograph(fashion_dir, tmp_path, monkeypatch):
    from tensorflow.python.autograph.impl import api as autograph_api

    converted = []
    transform = autograph_api._TRANSPILER.transform

    def recording_transform(entity, *args, **kwargs):
        converted.append(getattr(entity, "__qualname__", repr(entity)))
        return transform(entity, *args, **kwargs)

    monkeypatch.setattr(autograph_api._TRANSPILER, "transform", recording_transform)
    # Random ops, a training order, a finite pass with the end marker, TFRecords with a bad one.
    take(make_local_iterator(fashion_config(fashion_dir), 0, 1), 2)
    records = [encode_example(encode_image(np.zeros((4, 4, 3), np.uint8)), "c")] * 3
    files = write_records(tmp_path / "pairs.tfrecord", [*records, b"not an example"])
    config = tfrecord_config(
        files,
        "decode|inception_crop(8)|flip_lr|value_range(-1, 1)|tokenize(max_len=8)",
        num_epochs=1,
        batch_size=2,
    )
    list(make_local_iterator(config, 0, 1))
    assert converted == []


def test_state_size_does_not_grow_with_the_step(fashion_dir):
    iterator = make_local_iterator(fashion_config(fashion_dir), 0, 1)
    take(iterator, 2)
    early = iterator.get_state().nbytes
    take(iterator, 200)
    late = iterator.get_state().nbytes
    # 100x more batches read; only the autotuned number of in-flight elements may differ.
    assert late < 3 * early


def test_state_from_another_layout_is_refused(fashion_dir):
    iterator = make_local_iterator(fashion_config(fashion_dir), 0, 1)
    next(iterator)
    state = iterator.get_state()
    other = make_local_iterator(fashion_config(fashion_dir, batch_size=4), 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        other.set_state(state)


def test_per_process_batch_size():
    assert per_process_batch_size(256, 4) == 64
    with pytest.raises(ValueError, match="not divisible by the process count 4"):
        per_process_batch_size(250, 4)


def test_processes_get_disjoint_halves_and_per_process_batches(fashion_dir):
    config = fashion_config(fashion_dir, pp=INDEX_PP, batch_size=8)
    seen = []
    for process in range(2):
        batches = take(make_local_iterator(config, process, 2), 5)  # 5 x 4 = one epoch of 20
        assert all(b["image"].shape[0] == 4 for b in batches)
        seen.append({int(v) for b in batches for v in b["image"][:, 0, 0, 0]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))
    with pytest.raises(ValueError, match="not divisible"):
        make_local_iterator(fashion_config(fashion_dir, batch_size=9), 0, 2)


@pytest.mark.parametrize("mesh_shape, axes", [((8,), ("data",)), ((4, 2), ("data", "model"))])
def test_global_arrays_are_sharded_on_the_data_axis(fashion_dir, mesh_shape, axes):
    assert jax.device_count() == 8
    mesh = jax.make_mesh(mesh_shape, axes)
    config = fashion_config(fashion_dir, batch_size=16)
    global_batches = take(make_global_iterator(config, mesh), 2)
    local_batches = take(make_local_iterator(config, 0, 1), 2)
    for global_batch, local_batch in zip(global_batches, local_batches, strict=True):
        assert set(global_batch) == {"image", "text", "label"}
        for key, array in global_batch.items():
            assert isinstance(array, jax.Array)
            assert array.sharding.spec == PartitionSpec("data")
            assert array.sharding.mesh.shape == dict(zip(axes, mesh_shape, strict=True))
            rows = 16 // mesh_shape[0]
            assert all(s.data.shape[0] == rows for s in array.addressable_shards)
            np.testing.assert_array_equal(np.asarray(array), local_batch[key])
        assert global_batch["image"].dtype == np.float32
        assert global_batch["text"].dtype == np.int32


def test_global_batch_must_divide_the_data_axis(fashion_dir):
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="not divisible by the mesh's 'data' size 8"):
        make_global_iterator(fashion_config(fashion_dir, batch_size=12), mesh)
    with pytest.raises(ValueError, match="no axis 'batch'"):
        make_global_iterator(fashion_config(fashion_dir), mesh, data_axis="batch")


@pytest.mark.parametrize(
    "pp, problem",
    [
        ("decode|tokenize(max_len=8)", "'image' is uint8"),
        ("decode(channels=1)|resize(32)|value_range(-1, 1)|tokenize(8)", "needs float32 [H, W, 3]"),
        ("decode|resize(32)|value_range(-1, 1)", "'text' is string"),
        ("drop('image')|tokenize(8)", "no 'image'"),
    ],
)
def test_batch_contract_violations_fail_before_reading(fashion_dir, pp, problem):
    with pytest.raises(BatchContractError) as error:
        make_local_iterator(fashion_config(fashion_dir, pp=pp), 0, 1)
    assert problem in str(error.value)


def test_resume_of_a_sharded_tfrecord_source_with_random_ops_and_sentencepiece(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"picture number {i} of a shoe" for i in range(200)))
    model = train_sentencepiece(corpus, 30, tmp_path / "sp")
    for shard in range(3):
        with tf.io.TFRecordWriter(str(tmp_path / f"pairs-{shard}.tfrecord")) as writer:
            for i in range(shard, 30, 3):
                image = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
                writer.write(encode_example(encode_image(image), f"picture number {i}"))
    pp = (
        "decode|inception_crop(12)|random_crop(10)|flip_lr|value_range(-1, 1)|"
        f"tokenize(max_len=8, model='sentencepiece:{model}')"
    )
    config = tfrecord_config(str(tmp_path / "pairs-*.tfrecord"), pp=pp, shuffle_buffer=10)
    reference = make_local_iterator(config, 0, 1)
    take(reference, 9)  # past the first epoch of 30 records
    state = reference.get_state()
    expected = take(reference, 5)
    resumed = make_local_iterator(config, 0, 1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected)
