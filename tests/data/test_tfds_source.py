"""A TFDS dataset prepared by the test itself (no download) as an image-text or label source."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data.pipeline import make_local_iterator
from data.sources import TfdsSource, make_source
from data.tokenizers import make_tokenizer
from tests.data.helpers import (
    assert_same_batches,
    check_resumes,
    concatenated,
    labelled_image,
    take,
)

N = 24
CLASSES = ["tabby cat", "golden retriever", "fire truck"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    images = np.stack([labelled_image(i) for i in range(N)])

    def split(n):
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": images[:n],
                "caption": [f"picture {i}" for i in range(n)],
                "label": np.arange(n) % 3,
            }
        )

    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=CLASSES),
        }
    )
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_pairs",
        version="1.0.0",
        features=features,
        data_dir=root,
        split_datasets={"train": split(N), "test": split(8)},
    )
    builder.download_and_prepare()
    return str(root)


def config(data_dir, **source):
    return {
        "source": {"name": "tfds", "dataset": "tiny_pairs", "data_dir": data_dir, **source},
        "pp": "decode|resize(8)|value_range(0, 255)|tokenize(max_len=8)",
        "batch_size": 4,
        "shuffle_buffer": 8,
        "prefetch": 1,
    }


def test_image_text_batches_cover_the_split(tfds_dir):
    iterator = make_local_iterator(config(tfds_dir, text_key="caption", label_key="label"), 0, 1)
    tokenizer = make_tokenizer("minilm")
    seen = []
    for _ in range(N // 4):
        batch = next(iterator)
        indices = batch["image"][:, 0, 0, 0].astype(int)
        seen += indices.tolist()
        expected = tokenizer.tokenize(tf.constant([f"picture {i}" for i in indices]), 8).numpy()
        np.testing.assert_array_equal(batch["text"], expected)
        np.testing.assert_array_equal(batch["label"], indices % 3)
    assert sorted(seen) == list(range(N))


def test_label_only_dataset_gets_captions_from_class_names(tfds_dir):
    iterator = make_local_iterator(config(tfds_dir, label_key="label", split="test"), 0, 1)
    source = make_source("tfds", dataset="tiny_pairs", data_dir=tfds_dir, label_key="label")
    tokenizer = make_tokenizer("minilm")
    allowed = [
        {tuple(r) for r in tokenizer.tokenize(tf.constant(c), 8).numpy()}
        for c in source.captions.captions_per_class
    ]
    assert all(
        any(name in c for c in source.captions.captions_per_class[k])
        for k, name in enumerate(CLASSES)
    )
    for _ in range(4):
        batch = next(iterator)
        for text, label in zip(batch["text"], batch["label"], strict=True):
            assert tuple(text) in allowed[label]


def test_processes_read_disjoint_even_splits(tfds_dir):
    source = TfdsSource("tiny_pairs", data_dir=tfds_dir, text_key="caption")
    shares = [
        {r["text"].decode() for r in source.records(p, 3, seed=0).as_numpy_iterator()}
        for p in range(3)
    ]
    assert [len(s) for s in shares] == [8, 8, 8]
    assert set.union(*shares) == {f"picture {i}" for i in range(N)}


def test_unknown_features_are_named(tfds_dir):
    with pytest.raises(ValueError, match="no feature 'text'.*caption"):
        TfdsSource("tiny_pairs", data_dir=tfds_dir, text_key="text")
    with pytest.raises(ValueError, match="text_key or label_key"):
        TfdsSource("tiny_pairs", data_dir=tfds_dir)


def test_training_order_resumes_exactly_and_ignores_the_process_count(tfds_dir):
    block = config(tfds_dir, text_key="caption", label_key="label")
    block.update(
        pp="decode|inception_crop(6)|flip_lr|value_range(0, 255)|tokenize(max_len=8)",
        shuffle_buffer=5,
        batch_size=4,
    )
    # One shard: two processes share it by example, and get the single process's batches.
    single = take(make_local_iterator(block, 0, 1), 8)
    pair = [make_local_iterator(block, p, 2) for p in range(2)]
    assert_same_batches(concatenated(pair, 8), single)
    # 24 records, windows of 5: mid-window (after 1), at a window's end (5), past an epoch (7).
    check_resumes(block, 0, 1, 9, resume_after=[1, 5, 7])
    check_resumes(block, 1, 2, 5, resume_after=[2])
