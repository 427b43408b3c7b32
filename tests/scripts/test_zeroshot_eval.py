"""scripts.zeroshot_eval end to end, on a tiny HET-XL run that scripts.train trains for 2 steps:
the run's own evaluator, an image folder with class-name and template files, Monte-Carlo
calibration, the reliability plot, retrieval on TFRecords and on Fashion-MNIST captions."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from contrastive.evaluators.build import build_evaluator
from contrastive.evaluators.datasets import classification_dataset
from contrastive.mesh import make_mesh
from contrastive.trainer import build_task, validate_config
from data.config_blocks import ConfigError
from data.zeroshot_texts import FASHION_MNIST_CLASSNAMES, tfds_classnames_and_templates
from scripts import make_tfrecords, train, zeroshot_eval
from scripts.config_loader import load_config
from tests.data.helpers import make_fashion_dir
from tests.shared import once_per_session

FASHION_TEST = 10

CONFIG = """
import ml_collections

DATA = {data_dir!r}
TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def fashion(split, training, pp):
    block = dict(
        source=dict(name="fashion_mnist", data_dir=DATA, split=split),
        pp=pp,
        batch_size=16 if training else 8,
        shuffle_buffer=32 if training else 0,
        seed=0,
        prefetch=1,
    )
    if not training:
        block["num_epochs"] = 1
    return block


def get_config(arg=None):
    loss = arg or "hetxl"
    return ml_collections.ConfigDict(dict(
        task="contrastive",
        seed=0,
        input=fashion(
            "train", True, "decode|resize(28)|value_range(-1, 1)|tokenize(max_len=12)"
        ),
        model=dict(
            image_tower=dict(name="vit", patch_size=(14, 14), pool_type="gap", **TOWER),
            text_tower=dict(
                name="text_transformer", vocab_size=30522, max_len=12, pool_type="last", **TOWER
            ),
            embed_dim=16,
            noise=dict(num_factors=2, diag_scale_init=0.05, kernel_init_scale=0.1)
            if loss == "hetxl" else None,
            temperature=dict(mode="bounded_log", init=0.1, lo=0.01, hi=1.0),
            image_size=28,
            text_length=12,
        ),
        loss=dict(name=loss, column_chunk_size=8) if loss == "hetxl" else dict(name=loss),
        sampling=dict(train_samples=4, eval_samples=4, chunk_size=2),
        optim=dict(name="adamw", lr=1e-3),
        total_steps=2,
        log_every=1,
        evals=dict(
            zeroshot=dict(
                kind="zeroshot",
                every_steps=1000,
                dataset="fashion_mnist",
                input=fashion("test", False, "decode|resize(28)|value_range(-1, 1)|drop('text')"),
                tokenizer="minilm",
                text_length=12,
            )
        ),
        checkpoint=dict(every_steps=2, keep=1, async_save=False),
    ))
"""

FOLDER_CLASSES = {"fire_truck": 3, "golden_retriever": 2, "tabby_cat": 4}  # sorted: label order


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The trained workdir, the Fashion-MNIST files, an image folder and TFRecord pairs (built
    once per test session, shared by the tests of every worker)."""

    def build(root):
        make_fashion_dir(root / "fashion", n_train=32, n_test=FASHION_TEST)
        config = root / "tiny.py"
        config.write_text(CONFIG.format(data_dir=str(root / "fashion")))
        assert train.main(["--config", str(config), "--workdir", str(root / "run")]) == 0

        rng = np.random.default_rng(0)
        folder = root / "folder"
        for name, count in FOLDER_CLASSES.items():
            (folder / name).mkdir(parents=True)
            for i in range(count):
                size = (20 + 7 * i, 36)  # photos of different shapes, one grey
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
                image.save(folder / name / f"{i}.png")
        (folder / "tabby_cat" / "notes.txt").write_text("not an image")

        captions = ["a red fire truck", "a dog on grass", "a dog on grass", "a sleeping cat", "cat"]
        manifest = root / "pairs.csv"
        rows = ["image,caption"] + [
            f"folder/{name}/0.png,{caption}"
            for name, caption in zip(
                ["fire_truck", "golden_retriever", "golden_retriever", "tabby_cat", "tabby_cat"],
                captions,
                strict=True,
            )
        ]
        manifest.write_text("\n".join(rows) + "\n")
        assert make_tfrecords.main(["--input", str(manifest), "--output", str(root / "pairs")]) == 0
        return {
            "run": str(root / "run"),
            "config": str(config),
            "fashion": str(root / "fashion"),
            "folder": str(folder),
            "pairs": str(root / "pairs-*.tfrecord"),
            "num_pairs": len(captions),
        }

    return once_per_session(tmp_path_factory, "zeroshot_eval", build)


def test_without_a_dataset_the_runs_own_evaluator_runs(files, capsys):
    report = zeroshot_eval.main(["--workdir", files["run"]])
    assert report["step"] == 2 and report["dataset"] == "fashion_mnist"
    assert report["num_examples"] == FASHION_TEST
    assert report["classes"] == list(FASHION_MNIST_CLASSNAMES) and report["templates"] == 80
    for key in ("top1", "top5", "nll", "ece", "brier"):
        assert np.isfinite(report[key]), key
    assert sum(report["per_class_examples"]) == FASHION_TEST
    table = capsys.readouterr().out
    assert "all (top-1)" in table and "pair of trousers" in table and "ECE" in table


def test_image_folder_with_class_names_templates_monte_carlo_and_plot(files, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("fire engine\ngolden retriever dog\n\ncat\n")  # blank lines are skipped
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na blurry picture of the {c}.\n")
    out, png = tmp_path / "report.json", tmp_path / "reliability.png"
    args = ["--workdir", files["run"], "--dataset", f"folder:{files['folder']}"]
    args += ["--classnames", str(names), "--templates", str(templates), "--mc_samples", "4"]
    args += ["--batch_size", "8", "--json", str(out), "--plot", str(png)]
    report = zeroshot_eval.main(args)

    assert report["classes"] == ["fire engine", "golden retriever dog", "cat"]
    assert report["templates"] == 2
    assert report["num_examples"] == sum(FOLDER_CLASSES.values())  # notes.txt is no image
    assert report["per_class_examples"] == list(FOLDER_CLASSES.values())
    assert "top5" not in report  # three classes
    for key in ("top1", "nll", "ece", "brier", "mc_top1", "mc_nll", "mc_ece", "mc_brier"):
        assert np.isfinite(report[key]), key
    assert report["mc_samples"] == 4 and report["mc_nll"] != report["nll"]
    assert 0 <= report["brier"] <= 2 and 0 <= report["mc_ece"] <= 1
    assert json.loads(out.read_text())["top1"] == report["top1"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_folder_names_default_to_the_folder_names(files):
    by_prefix = classification_dataset(f"folder:{files['folder']}")
    by_data_dir = classification_dataset("image_folder", data_dir=files["folder"])
    assert by_prefix == by_data_dir
    assert by_prefix.classnames == ["fire truck", "golden retriever", "tabby cat"]
    assert by_prefix.source == dict(name="image_folder", root=files["folder"], classnames=None)


def test_any_tfds_classification_dataset_by_name(files, tmp_path):
    data_dir = str(tmp_path / "tfds")
    images = np.random.default_rng(1).integers(0, 256, (5, 24, 30, 3), dtype=np.uint8)
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_animals",
        version="1.0.0",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(24, 30, 3)),
                "label": tfds.features.ClassLabel(names=["aquarium_fish", "cat"]),
            }
        ),
        data_dir=data_dir,
        split_datasets={
            "train": tf.data.Dataset.from_tensor_slices({"image": images, "label": [0] * 5}),
            "test": tf.data.Dataset.from_tensor_slices(
                {"image": images, "label": [0, 1] * 2 + [1]}
            ),
        },
    ).download_and_prepare()
    # A bare name falls back to TFDS; the test split is preferred; ClassLabel names made readable.
    args = ["--workdir", files["run"], "--dataset", "tiny_animals", "--data_dir", data_dir]
    report = zeroshot_eval.main(args + ["--batch_size", "8"])
    assert report["dataset"] == "tiny_animals (test)"
    assert report["classes"] == ["aquarium fish", "cat"] and report["templates"] == 80
    assert report["per_class_examples"] == [2, 3]


def test_clip_benchmark_names_and_templates_for_known_tfds_datasets():
    names, templates = tfds_classnames_and_templates("cifar10:3.0.2", ["airplane", "cat"])
    assert names == ["airplane", "cat"] and "a blurry photo of a {c}." in templates
    assert len(templates) != 80  # cifar10's own templates, not the ImageNet ones
    pets, _ = tfds_classnames_and_templates("oxford_iiit_pet", [f"id_{i}" for i in range(37)])
    assert "Abyssinian" in pets  # clip_benchmark's names for the 37 pet breeds
    fallback, _ = tfds_classnames_and_templates("oxford_iiit_pet", ["a_b", "c"])
    assert fallback == ["a b", "c"]  # a different class count: the dataset's own names


def test_retrieval_on_tfrecord_pairs(files, capsys):
    args = ["--workdir", files["run"], "--retrieval", "--dataset", f"tfrecord:{files['pairs']}"]
    report = zeroshot_eval.main(args + ["--batch_size", "8"])
    assert report["num_pairs"] == files["num_pairs"]
    for direction in ("image_to_text", "text_to_image"):
        recalls = [report[f"{direction}_r{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] == 1.0  # 5 pairs: R@5 = R@10 = 1
    assert "image -> text" in capsys.readouterr().out


def test_retrieval_on_fashion_mnist_captions(files):
    args = ["--workdir", files["run"], "--retrieval", "--dataset", "fashion_mnist", "--json"]
    report = zeroshot_eval.main(args + ["--data_dir", files["fashion"], "--batch_size", "8"])
    assert report["num_pairs"] == FASHION_TEST


def test_usage_errors_are_reported_plainly(files, tmp_path):
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_text("a photo of a thing.\n")
    base = ["--workdir", files["run"], "--dataset", f"folder:{files['folder']}"]
    with pytest.raises(SystemExit, match="need '{c}'"):
        zeroshot_eval.main(base + ["--templates", str(bad_templates)])
    two_names = tmp_path / "names.txt"
    two_names.write_text("a\nb\n")
    with pytest.raises(SystemExit, match="2 class names given, the dataset has 3 classes"):
        zeroshot_eval.main(base + ["--classnames", str(two_names)])


def test_monte_carlo_on_a_deterministic_model_is_a_clear_error(files):
    values = validate_config(load_config(f"{files['config']}:clip"))
    mesh = make_mesh()
    block = {**values["evals"]["zeroshot"], "monte_carlo": True}
    values = {**values, "sampling": {"eval_samples": 4}}
    with pytest.raises(ConfigError, match="need a model with HET-XL image noise"):
        build_evaluator("zeroshot", block, values, build_task(values, mesh).model, mesh)
