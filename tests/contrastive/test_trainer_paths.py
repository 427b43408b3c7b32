"""Trainer paths run end to end through train(), two runs covering them all on tiny towers:

- contrastive: TFRecord captions, LiT (image tower loaded from a ViT npz and frozen with
  optim.freeze), text-side HET-XL noise, a 4 x 2 data x FSDP mesh, length in total_examples;
- classification: the HET head with a sigmoid likelihood on a TFDS image-label dataset.
"""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from flax.traverse_util import flatten_dict
from PIL import Image

from contrastive.metric_logging import read_metrics
from contrastive.trainer import load_trained, train
from data.convert import write_shards
from models import pretrained, vit
from tests.contrastive.test_trainer import contrastive_config, tiny_tower

IMAGE = 28


@pytest.fixture(scope="module")
def caption_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths_records")
    rng = np.random.default_rng(0)
    pairs = []
    for index in range(32):
        path = root / f"{index:02d}.png"
        Image.fromarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), np.uint8)).save(path)
        pairs.append((str(path), f"picture number {index % 4}"))
    write_shards(pairs, str(root / "pairs"), 2)
    return str(root / "pairs-*.tfrecord")


def test_lit_with_tfrecords_text_noise_fsdp_and_a_length_in_examples(caption_records, tmp_path):
    # A pretrained image tower: the tiny ViT with random weights, saved as a big_vision npz.
    tower = dict(patch_size=(14, 14), pool_type="gap", **tiny_tower())
    source_params = vit.Model(**tower).init(jax.random.key(42), np.zeros((1, IMAGE, IMAGE, 3)))
    pretrained.save_vit_npz(tmp_path / "vit.npz", source_params["params"])

    config = contrastive_config("unused", "hetxl")
    with config.unlocked():
        config.input.source = dict(name="tfrecord", files=caption_records)
        config.input.pp = (
            f"decode|resize({IMAGE})|value_range(-1, 1)|tokenize(max_len=12, model='minilm')"
        )
        config.evals = {}
        config.model.text_noise = True
        config.model_init = dict(image=dict(npz=str(tmp_path / "vit.npz")))
        config.optim.freeze = ["img/.*"]
        config.mesh = dict(data=4, fsdp=2)
        del config["total_steps"]
        config.total_examples = 3 * config.input.batch_size
    workdir = tmp_path / "run"
    assert train(config, workdir).step == 3

    params = flatten_dict(jax.device_get(load_trained(workdir).params), sep="/")
    loaded = flatten_dict(source_params["params"], sep="/")
    for name, value in loaded.items():  # loaded from the npz and never updated
        np.testing.assert_array_equal(params[f"img/{name}"], value, err_msg=name)
    assert any(name.startswith("text_noise_params/") for name in params)
    rows = read_metrics(str(workdir))
    assert rows[-1]["step"] == 3 and np.isfinite(rows[-1]["loss"])


@pytest.fixture(scope="module")
def tfds_labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths_tfds")
    rng = np.random.default_rng(1)
    count = 24
    split = tf.data.Dataset.from_tensor_slices(
        {
            "image": rng.integers(0, 255, (count, 16, 16, 3), np.uint8),
            "label": np.arange(count) % 3,
        }
    )
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(16, 16, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }
    )
    tfds.dataset_builders.store_as_tfds_dataset(
        name="three_labels",
        version="1.0.0",
        features=features,
        data_dir=root,
        split_datasets={"train": split},
    ).download_and_prepare()
    return str(root)


def test_het_head_with_a_sigmoid_likelihood_on_tfds(tfds_labels, tmp_path):
    config = dict(
        task="classification",
        seed=0,
        input=dict(
            source=dict(
                name="tfds", dataset="three_labels", data_dir=tfds_labels, label_key="label"
            ),
            pp="decode|resize(16)|value_range(-1, 1)|keep('image', 'label')",
            batch_size=8,
            shuffle_buffer=16,
            seed=0,
            prefetch=1,
        ),
        model=dict(
            image_tower=dict(name="vit", patch_size=(8, 8), pool_type="gap", **tiny_tower()),
            num_classes=3,
            head="het",
            likelihood="sigmoid",
            noise=dict(num_factors=2),
            temperature=dict(mode="bounded", lo=0.05, hi=5.0),
        ),
        sampling=dict(train_samples=4, eval_samples=4, chunk_size=2),
        optim=dict(name="adamw", lr=1e-3, schedule=dict(name="cosine")),
        total_steps=3,
        log_every=1,
        checkpoint=dict(every_steps=3, keep=1),
    )
    assert train(config, tmp_path).step == 3
    rows = read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in rows)
    # HET: the noise lives in the K = 3 logits (HET-XL's would live in the 32-d pre-logits).
    params = flatten_dict(jax.device_get(load_trained(tmp_path).params), sep="/")
    assert params["classifier/noise/factor_loadings"].shape == (2, 3)
    assert params["classifier/noise/diag_scale/kernel"].shape == (32, 3)
