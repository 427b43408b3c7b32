"""A class-per-folder image tree as a label-only source: labels by sorted folder, captions from
class names, corrupt files skipped and counted, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from data.pipeline import make_local_iterator
from data.sources import make_source
from data.tokenizers import make_tokenizer
from tests.data.helpers import assert_same_batches, encode_image, take

CLASSES = ["golden retriever", "fire truck", "tabby cat"]  # folder names; sorted differently
PP = "decode|resize(8)|value_range(0, 255)|tokenize(max_len=16)"


@pytest.fixture
def image_root(tmp_path):
    """3 class folders with PNG and JPEG files; image i is flat red = 20 * i (flat, so that JPEG
    keeps it within a few levels). One corrupt file (not last: a pass's trailing failures have no
    later record to reveal them) and one non-image file sit in the 'tabby cat' folder."""
    index = 0
    for name in CLASSES:
        folder = tmp_path / name
        folder.mkdir()
        for k in range(4):
            fmt = "PNG" if k % 2 else "JPEG"
            suffix = ".png" if k % 2 else ".JPEG"  # ImageNet's upper-case extension
            flat = np.zeros((8, 8, 3), np.uint8)
            flat[..., 0] = 20 * index
            (folder / f"{index:02d}{suffix}").write_bytes(encode_image(flat, fmt))
            index += 1
    (tmp_path / "tabby cat" / "09-broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "tabby cat" / "notes.txt").write_text("not an image")
    return tmp_path


def config(root, **overrides):
    block = {
        "source": {"name": "image_folder", "root": str(root)},
        "pp": PP,
        "batch_size": 4,
        "shuffle_buffer": 0,
        "num_epochs": 1,
        "prefetch": 1,
    }
    block.update(overrides)
    return block


def test_one_pass_labels_by_sorted_folder_and_counts_the_corrupt_file(image_root):
    source = make_source("image_folder", root=str(image_root))
    assert source.classes == sorted(CLASSES)
    assert source.num_examples() == 13  # 12 images + the corrupt one; notes.txt is no image
    iterator = make_local_iterator(config(image_root), 0, 1)
    red, labels = [], []
    for batch in iterator:
        red += np.round(batch["image"][:, 0, 0, 0] / 20).astype(int).tolist()
        labels += batch["label"].tolist()
    assert sorted(red) == list(range(12))
    label_of_folder = {name: sorted(CLASSES).index(name) for name in CLASSES}
    expected = {i: label_of_folder[CLASSES[i // 4]] for i in range(12)}
    assert dict(zip(red, labels, strict=True)) == expected
    assert iterator.skipped()["undecodable"] == 1
    assert sum(iterator.skipped().values()) == 1


def test_captions_come_from_class_names_or_the_given_classnames(image_root):
    readable = ["hound", "truck", "kitten"]  # for the sorted folders
    source = make_source("image_folder", root=str(image_root), classnames=readable)
    assert all(
        any(name in c for c in source.captions.captions_per_class[k])
        for k, name in enumerate(readable)
    )
    tokenizer = make_tokenizer("minilm")
    allowed = [
        {tuple(r) for r in tokenizer.tokenize(tf.constant(c), 16).numpy()}
        for c in source.captions.captions_per_class
    ]
    block = config(image_root)
    block["source"]["classnames"] = readable
    for batch in make_local_iterator(block, 0, 1):
        for text, label in zip(batch["text"], batch["label"], strict=True):
            assert tuple(text) in allowed[label]
    with pytest.raises(ValueError, match="2 classnames for 3 class folders"):
        make_source("image_folder", root=str(image_root), classnames=readable[:2])


def test_training_order_resumes_exactly_and_ignores_the_process_count(image_root):
    # Batches are the same for any process count on clean data only.
    (image_root / "tabby cat" / "09-broken.jpg").unlink()
    block = config(image_root, shuffle_buffer=5, num_epochs=None)
    block["pp"] = "decode|inception_crop(8)|flip_lr|value_range(0, 255)|tokenize(max_len=16)"
    reference = make_local_iterator(block, 0, 1)
    expected = take(reference, 10)  # 3 batches a pass
    pair = [make_local_iterator(block, p, 2) for p in range(2)]
    for batch in expected[:4]:
        halves = [next(it) for it in pair]
        assert_same_batches([{k: np.concatenate([h[k] for h in halves]) for k in batch}], [batch])
    reference = make_local_iterator(block, 0, 1)
    take(reference, 4)
    resumed = make_local_iterator(block, 0, 1)
    resumed.set_state(reference.get_state())
    assert_same_batches(take(resumed, 6), expected[4:])


def test_missing_root_or_images_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_source("image_folder", root=str(tmp_path / "nothing"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        make_source("image_folder", root=str(tmp_path))
