"""Every user path goes through tf.io.gfile: sources, tokenizers and TFRecord writing work on TF's
in-memory file system (ram://) as they would on gs://."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import tensorflow as tf

from data.convert import write_shards
from data.fashion_mnist import load_split
from data.package_files import minilm_vocab_path
from data.pipeline import make_local_iterator
from data.tfrecords import read_manifest
from data.tokenizers import make_tokenizer, train_sentencepiece
from tests.data.helpers import (
    encode_image,
    good_record,
    labelled_image,
    make_fashion_dir,
    tfrecord_config,
    write_records,
)


@pytest.fixture
def ram():
    """A fresh ram:// folder, removed afterwards (the file system lives as long as the process)."""
    root = f"ram://{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(root)
    yield root
    tf.io.gfile.rmtree(root)


def copy_to(local_path, remote_path: str) -> str:
    tf.io.gfile.copy(str(local_path), remote_path, overwrite=True)
    return remote_path


def test_tfrecords_and_a_wordpiece_vocabulary_from_ram(ram):
    for k in range(2):
        write_records(f"{ram}/pairs-{k}.tfrecord", [good_record(i) for i in range(k, 12, 2)])
    vocab = copy_to(minilm_vocab_path(), f"{ram}/vocab.txt")
    pp = f"decode|resize(8)|value_range(0, 255)|tokenize(max_len=8, model='wordpiece:{vocab}')"
    config = tfrecord_config(f"{ram}/pairs-*.tfrecord", pp=pp, num_epochs=1)
    local_tokenizer = make_tokenizer("minilm")
    seen = []
    for batch in make_local_iterator(config, 0, 1):
        indices = batch["image"][:, 0, 0, 0].astype(int)
        seen += indices.tolist()
        expected = local_tokenizer.tokenize(tf.constant([f"caption {i}" for i in indices]), 8)
        np.testing.assert_array_equal(batch["text"], expected.numpy())
    assert sorted(seen) == list(range(12))


def test_sentencepiece_model_from_ram(ram, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"picture number {i} of a shoe" for i in range(200)))
    model = train_sentencepiece(corpus, 30, tmp_path / "sp")
    remote = copy_to(model, f"{ram}/sp.model")
    text = tf.constant(["picture number 7 of a shoe"])
    np.testing.assert_array_equal(
        make_tokenizer(f"sentencepiece:{remote}").tokenize(text, 12).numpy(),
        make_tokenizer(f"sentencepiece:{model}").tokenize(text, 12).numpy(),
    )
    with pytest.raises(FileNotFoundError, match="no file"):
        make_tokenizer(f"sentencepiece:{ram}/missing.model")


def test_fashion_mnist_files_from_ram(ram, tmp_path):
    data = make_fashion_dir(tmp_path, n_train=20, n_test=4)
    for path in tmp_path.iterdir():
        copy_to(path, f"{ram}/{path.name}")
    images, labels = load_split(ram, "train")
    np.testing.assert_array_equal(images[..., 0], data["train"][0])
    np.testing.assert_array_equal(labels, data["train"][1])


def test_image_folder_from_ram(ram):
    for k, name in enumerate(["cat", "dog"]):
        for i in range(3):
            with tf.io.gfile.GFile(f"{ram}/images/{name}/{i}.png", "wb") as f:
                f.write(encode_image(labelled_image(10 * k + i)))
    config = {
        "source": {"name": "image_folder", "root": f"{ram}/images"},
        "pp": "decode|resize(8)|value_range(0, 255)|tokenize(max_len=16)",
        "batch_size": 2,
        "shuffle_buffer": 0,
        "num_epochs": 1,
    }
    pairs = {
        int(i): int(label)
        for batch in make_local_iterator(config, 0, 1)
        for i, label in zip(batch["image"][:, 0, 0, 0], batch["label"], strict=True)
    }
    assert pairs == {0: 0, 1: 0, 2: 0, 10: 1, 11: 1, 12: 1}


def test_manifest_and_shard_writing_on_ram(ram):
    for i in range(3):
        with tf.io.gfile.GFile(f"{ram}/img/{i}.png", "wb") as f:
            f.write(encode_image(labelled_image(i)))
    with tf.io.gfile.GFile(f"{ram}/pairs.csv", "w") as f:
        f.write("image,caption\n" + "".join(f"img/{i}.png,caption {i}\n" for i in range(3)))
    pairs = read_manifest(f"{ram}/pairs.csv")
    assert pairs == [(f"{ram}/img/{i}.png", f"caption {i}") for i in range(3)]
    stats = write_shards(pairs, f"{ram}/out/pairs", num_shards=2)
    assert stats.records_per_shard == [2, 1] and not stats.unreadable_images
    assert tf.io.gfile.glob(f"{ram}/out/pairs-*.tfrecord") == stats.paths
