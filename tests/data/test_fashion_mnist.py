"""Fashion-MNIST IDX reading, captions kept apart from zero-shot prompts, and its batches."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import tensorflow as tf

from data.fashion_mnist import (
    LABEL_NAMES,
    FashionMnistSource,
    fashion_mnist_captions,
    load_split,
    noisy_labels,
    read_idx,
)
from data.package_files import clip_benchmark_file
from data.pipeline import make_local_iterator
from data.tokenizers import make_tokenizer
from data.zeroshot_texts import FASHION_MNIST_CLASSNAMES, classnames_and_templates
from tests.data.helpers import fashion_config, make_fashion_dir, write_idx


def load_json(name: str) -> dict:
    with open(clip_benchmark_file(name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_written_array(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_truncated_and_foreign_idx_files_fail_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="x-idx3-ubyte.*declares"):
        read_idx(path)
    (tmp_path / "y").write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "y")


def test_load_split_pairs_images_and_labels(tmp_path):
    data = make_fashion_dir(tmp_path, n_train=30, n_test=10)
    images, labels = load_split(tmp_path, "train")
    assert images.shape == (30, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], data["train"][0])
    np.testing.assert_array_equal(labels, data["train"][1])
    assert load_split(tmp_path, "test")[0].shape == (10, 28, 28, 1)
    with pytest.raises(ValueError, match="validation"):
        load_split(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_split(tmp_path / "missing", "test")


def test_processes_read_disjoint_shares_covering_the_split(tmp_path):
    make_fashion_dir(tmp_path, n_train=30)
    source = FashionMnistSource(data_dir=str(tmp_path))
    seen = []
    for process in range(3):
        ds = source.records(process, 3, seed=0)
        seen += [int(r["image"][0, 0, 0]) for r in ds.as_numpy_iterator()]
    assert sorted(seen) == list(range(30))


def test_zero_shot_lookup():
    names, templates = classnames_and_templates("fashion_mnist")
    assert len(names) == 10 and len(set(names)) == 10
    assert templates == load_json("en_zeroshot_classification_templates.json")["imagenet1k"]
    assert len(templates) == 80
    names, templates = classnames_and_templates("imagenet1k")
    assert names == load_json("en_classnames.json")["imagenet1k"] and len(names) == 1000
    with pytest.raises(ValueError, match="imagenet1k"):
        classnames_and_templates("no_such_dataset")


def _prompt_key(text: str) -> str:
    """Case, punctuation and spacing do not make a caption different from a prompt."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation.replace("-", "")))
    return " ".join("a" if w == "an" else w for w in text.split())


@pytest.mark.parametrize("cupl", [False, True])
def test_no_training_caption_is_a_zero_shot_prompt(cupl):
    templates = load_json("en_zeroshot_classification_templates.json")["imagenet1k"]
    classnames = set(load_json("en_classnames.json")["imagenet1k"]) | set(FASHION_MNIST_CLASSNAMES)
    classnames |= set(LABEL_NAMES) | {"sweater", "jumper", "trainer", "handbag"}
    prompts = {t.replace("{c}", c) for t in templates for c in classnames}
    prompt_keys = {_prompt_key(p) for p in prompts}
    captions = [c for per_class in fashion_mnist_captions(cupl) for c in per_class]
    assert not prompts & set(captions)
    assert not prompt_keys & {_prompt_key(c) for c in captions}
    # The bare "a photo of a pullover" is a prompt; the attribute version is a training caption.
    assert "a photo of a pullover" not in captions
    assert "a photo of a black pullover" in fashion_mnist_captions(cupl)[2]


def test_captions_vary_within_a_class_and_name_it():
    captions = fashion_mnist_captions()
    assert len(captions) == 10
    assert all(len(set(c)) >= 100 for c in captions)
    assert any("ankle boot" in c for c in captions[9])
    assert not any("ankle boot" in c for c in captions[0])
    assert "a product shot of an ankle boot" in captions[9]


def test_cupl_adds_sentences_of_related_imagenet_classes_minus_prompts():
    cupl = load_json("cupl_prompts.json")["imagenet1k"]["sandal"]
    templates = load_json("en_zeroshot_classification_templates.json")["imagenet1k"]
    prompt_keys = {_prompt_key(t.replace("{c}", "sandal")) for t in templates}
    # The CuPL file itself contains filled CLIP prompts ("a photo of the sandal."); they must go.
    assert any(_prompt_key(s) in prompt_keys for s in cupl)
    kept = {s.strip() for s in cupl if _prompt_key(s) not in prompt_keys}
    with_cupl = fashion_mnist_captions(cupl=True)
    assert kept <= set(with_cupl[5])
    assert len(with_cupl[5]) > len(fashion_mnist_captions()[5])
    assert with_cupl[6] == fashion_mnist_captions()[6]  # no related ImageNet class for "shirt"


def test_config_max_len_holds_every_caption():
    ids = make_tokenizer("minilm").tokenize(
        tf.constant([c for per_class in fashion_mnist_captions() for c in per_class]), 64
    )
    assert int(tf.reduce_max(tf.reduce_sum(tf.cast(ids != 0, tf.int32), 1))) <= 20


def test_batches_are_rgb_at_the_configured_size_with_matching_captions(tmp_path):
    data = make_fashion_dir(tmp_path, n_train=40)
    iterator = make_local_iterator(
        fashion_config(tmp_path, pp="decode|resize(32)|value_range(-1, 1)|tokenize(max_len=20)"),
        0,
        1,
    )
    tokenizer = make_tokenizer("minilm")
    per_class = [
        {tuple(row) for row in tokenizer.tokenize(tf.constant(list(c)), 20).numpy()}
        for c in fashion_mnist_captions()
    ]
    texts_by_label = {}
    for _ in range(5):
        batch = next(iterator)
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["text"].shape == (8, 20) and batch["text"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        # Grey in, RGB out: the three channels are equal.
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
        for text, label in zip(batch["text"], batch["label"], strict=True):
            assert tuple(text) in per_class[label]
            texts_by_label.setdefault(int(label), set()).add(tuple(text))
    assert set(np.unique(data["train"][1])) == set(range(10))
    assert max(len(v) for v in texts_by_label.values()) > 1  # captions vary per example


# Input-dependent label noise (the module doc of data/fashion_mnist.py).
CONFUSABLE = {0, 2, 4, 6}


def test_label_noise_flips_each_class_at_its_rate_to_the_allowed_classes():
    assert {LABEL_NAMES[c] for c in CONFUSABLE} == {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    n_per_class, p_confusable, p_other = 20_000, 0.3, 0.05
    clean = np.repeat(np.arange(10), n_per_class)
    noisy = noisy_labels(clean, p_confusable, p_other, seed=7)
    for label in range(10):
        targets = noisy[clean == label]
        p = p_confusable if label in CONFUSABLE else p_other
        allowed = (CONFUSABLE if label in CONFUSABLE else set(range(10))) - {label}
        # Binomial counts: 5 standard deviations either way.
        tolerance = 5 * np.sqrt(p * (1 - p) / n_per_class)
        assert abs(np.mean(targets != label) - p) < tolerance, label
        counts = np.bincount(targets[targets != label], minlength=10)
        assert set(np.flatnonzero(counts)) == allowed
        # Each allowed wrong class gets an equal share of the flips.
        share = p / len(allowed)
        shares = counts[sorted(allowed)] / n_per_class
        assert np.all(np.abs(shares - share) < 5 * np.sqrt(share * (1 - share) / n_per_class))


def test_label_noise_is_input_dependent_and_a_function_of_seed_and_example():
    clean = np.arange(50_000) % 10
    noisy = noisy_labels(clean, 0.4, 0.02, seed=3)
    confusable = np.isin(clean, list(CONFUSABLE))
    assert np.mean(noisy[confusable] != clean[confusable]) > 10 * np.mean(
        noisy[~confusable] != clean[~confusable]
    )
    np.testing.assert_array_equal(noisy, noisy_labels(clean, 0.4, 0.02, seed=3))
    # An example's label does not depend on how many examples follow it.
    np.testing.assert_array_equal(noisy[:1000], noisy_labels(clean[:1000], 0.4, 0.02, seed=3))
    assert np.mean(noisy != noisy_labels(clean, 0.4, 0.02, seed=4)) > 0.1
    np.testing.assert_array_equal(noisy_labels(clean, 0.0, 0.0, seed=3), clean)
    assert np.all(noisy_labels(clean, 1.0, 0.0, seed=3)[confusable] != clean[confusable])
    with pytest.raises(ValueError, match="label_noise_other"):
        noisy_labels(clean, 0.1, 1.5, seed=0)


def test_source_captions_follow_the_noisy_labels_and_keeps_the_clean_ones(tmp_path):
    data = make_fashion_dir(tmp_path, n_train=40)
    options = dict(label_noise_confusable=1.0, label_noise_other=0.0, label_noise_seed=5)
    source = FashionMnistSource(data_dir=str(tmp_path), **options)
    clean = data["train"][1]
    np.testing.assert_array_equal(source.clean_labels, clean)
    flipped = source.labels != clean
    np.testing.assert_array_equal(flipped, np.isin(clean, list(CONFUSABLE)))
    assert "label noise 1 confusable / 0 other: 40.0% flipped" in source.describe()

    pp = "decode|resize(28)|value_range(-1, 1)|tokenize(max_len=20)"
    config = fashion_config(tmp_path, pp=pp, shuffle_buffer=0)
    config["source"].update(options)
    iterator = make_local_iterator(config, 0, 1)
    tokenizer = make_tokenizer("minilm")
    per_class = [
        {tuple(row) for row in tokenizer.tokenize(tf.constant(list(c)), 20).numpy()}
        for c in fashion_mnist_captions()
    ]
    for _ in range(5):
        batch = next(iterator)
        # Pixel (0, 0) holds the example's index: its label and caption are the noisy ones.
        index = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
        np.testing.assert_array_equal(batch["label"], source.labels[index])
        for text, label in zip(batch["text"], batch["label"], strict=True):
            assert tuple(text) in per_class[label]


def test_reading_records_embeds_no_copy_of_the_images_in_the_graph(tmp_path):
    # A numpy array used inside a traced tf.data function becomes a graph constant, copied each
    # time an iterator is made (seconds for the 47 MB training split, at every evaluation).
    images, _ = make_fashion_dir(tmp_path, n_train=40)["train"]
    source = FashionMnistSource(str(tmp_path), "train")
    traced = tf.function(source.read, autograph=False).get_concrete_function(
        {"index": tf.TensorSpec([None], tf.int64)}
    )
    constant_bytes = [
        tf.make_ndarray(op.get_attr("value")).nbytes
        for op in traced.graph.get_operations()
        if op.type == "Const"
    ]
    assert max(constant_bytes, default=0) < images.nbytes
    index = tf.constant([3, 0], tf.int64)
    records = list(source.read({"index": index}))
    np.testing.assert_array_equal(records[0]["image"].numpy()[..., 0], images[3])
