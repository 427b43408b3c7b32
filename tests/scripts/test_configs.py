"""Every experiment config in configs/ loads, passes the trainer's validation, and builds and runs
its evaluators on small data the test writes with the real datasets' features."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from contrastive.evaluators.build import build_evaluators
from contrastive.mesh import make_mesh, replicated
from contrastive.trainer import build_task, validate_config
from data.config_blocks import ConfigError
from scripts.config_loader import load_config
from tests import REPO
from tests.data.helpers import make_fashion_dir

CONFIGS = sorted(
    path
    for path in (REPO / "configs").glob("*.py")
    if path.name not in ("__init__.py", "blocks.py", "data_fashion_mnist.py")
)
IMAGENET_VALIDATION = 6
FASHION_TEST = 12


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_validates(path, tmp_path):
    spec = str(path)
    if path.stem == "lit_hetxl":  # validation checks that the pretrained checkpoint exists
        with pytest.raises(ConfigError, match="model_init.image.npz: no file at B_16.npz"):
            validate_config(load_config(spec))
        (tmp_path / "B_16.npz").write_bytes(b"")
        spec += f":npz={tmp_path / 'B_16.npz'}"
    if path.stem == "pretrain":  # the user's own TFRecords are the one required arg
        with pytest.raises(ValueError, match="needs files=GLOB"):
            load_config(spec)
        spec += ":files=pairs-*.tfrecord"
    values = validate_config(load_config(spec))
    assert values["task"] in ("contrastive", "classification")


@pytest.mark.parametrize("arg", ["loss=clip", "loss=siglip", "loss=hetxl,epochs=1"])
def test_demo_arguments(arg):
    values = validate_config(load_config(f"configs/demo.py:{arg}"))
    assert values["loss"]["name"] == arg.split(",")[0].split("=")[1]
    assert (values["model"]["noise"] is not None) == (values["loss"]["name"] == "hetxl")


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match="lossy"):
        load_config("configs/demo.py:lossy=clip")


def test_a_config_argument_of_the_wrong_type_names_the_type_it_takes():
    with pytest.raises(ValueError, match=r"'batch=x': batch must be of type int \(default 256\)"):
        load_config("configs/bench_b16.py:batch=x")


# ------------------------------------------------------------------------------------------------
# Evaluators built for real


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Fake Fashion-MNIST IDX files, TFDS imagenet2012 (the real builder's features: JPEG image,
    1000-class label, file name; a validation split only) and a small TFDS image-label dataset."""
    root = tmp_path_factory.mktemp("config_data")
    make_fashion_dir(root / "fashion", n_train=16, n_test=FASHION_TEST)
    rng = np.random.default_rng(0)

    def store(name, features, splits):
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version=tfds.builder_cls(name).VERSION if name == "imagenet2012" else "1.0.0",
            features=tfds.features.FeaturesDict(features),
            data_dir=root / "tfds",
            split_datasets=splits,
        ).download_and_prepare()

    photos = rng.integers(0, 256, (IMAGENET_VALIDATION, 40, 56, 3), dtype=np.uint8)
    store(
        "imagenet2012",
        {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text(),
        },
        {
            "validation": tf.data.Dataset.from_tensor_slices(
                {
                    "image": photos,
                    "label": [0, 1, 2, 997, 998, 999],
                    "file_name": [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(len(photos))],
                }
            )
        },
    )
    store(
        "tiny_labels",
        {
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "dog", "fire_truck"]),
        },
        {
            split: tf.data.Dataset.from_tensor_slices(
                {
                    "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    "label": np.arange(n) % 3,
                }
            )
            for split, n in (("train", 8), ("test", 5))
        },
    )
    # Validation only checks that the pretrained checkpoint exists; tiny_model drops model_init.
    (root / "B_16.npz").write_bytes(b"")
    return {
        "fashion": str(root / "fashion"),
        "tfds": str(root / "tfds"),
        "npz": str(root / "B_16.npz"),
    }


# config spec (with the data folders filled in) -> examples each of its evaluators reads
EVAL_CASES = {
    "demo": ("configs/demo.py:data_dir={fashion}", FASHION_TEST),
    "siglip": ("configs/siglip.py:data_dir={fashion}", FASHION_TEST),
    "classify": ("configs/classify.py:data_dir={fashion},head=het", FASHION_TEST),
    "classify_tfds": ("configs/classify.py:dataset=tiny_labels,data_dir={tfds},classes=3", 5),
    "clip_hetxl": ("configs/clip_hetxl.py:imagenet_dir={tfds}", IMAGENET_VALIDATION),
    "lit_hetxl": ("configs/lit_hetxl.py:imagenet_dir={tfds},npz={npz}", IMAGENET_VALIDATION),
    "pretrain": ("configs/pretrain.py:files=x.tfrecord,imagenet_dir={tfds}", IMAGENET_VALIDATION),
}


def test_every_config_with_evaluators_is_covered():
    covered = {spec.split(":")[0] for spec, _ in EVAL_CASES.values()}
    for path in CONFIGS:
        if f"configs/{path.name}" not in covered:
            spec = f"{path}:files=x.tfrecord" if path.stem == "pretrain" else str(path)
            assert not validate_config(load_config(spec)).get("evals"), path.name


def tiny_model(values):
    """The config's model with towers small enough for a CPU test (same input shapes, same
    heads, noise and temperature): evaluators do not depend on the tower architecture."""
    model = dict(values["model"])
    size = model["image_size"]
    tower = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
    model["image_tower"] = dict(name="vit", patch_size=(size // 4,) * 2, pool_type="gap", **tower)
    if values["task"] == "contrastive":
        model["text_tower"] = dict(
            name="text_transformer",
            vocab_size=30522,
            max_len=model["text_length"],
            pool_type="last",
            **tower,
        )
        model["embed_dim"] = 16
    return {**values, "model": model, "model_init": {}}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_config_evaluators_build_and_run(case, data_dirs):
    spec, examples = EVAL_CASES[case]
    values = tiny_model(validate_config(load_config(spec.format(**data_dirs))))
    assert values["evals"], case
    for block in values["evals"].values():
        block["input"]["batch_size"] = 8  # one or two batches of the small split
        if block["kind"] == "zeroshot":
            # Two prompt templates instead of CLIP's 80: the same evaluator, with a fortieth of
            # the text-tower work (80 x 1000 prompts for the ImageNet configs).
            block["templates"] = ["a photo of a {c}.", "a drawing of a {c}."]
    mesh = make_mesh(values.get("mesh"))
    task = build_task(values, mesh)
    # Parameters live on the mesh, as in training and after load_trained.
    params = jax.jit(task.init_params, out_shardings=replicated(mesh))(jax.random.key(0))
    evaluators = build_evaluators(values, task.model, mesh)
    assert set(evaluators) == set(values["evals"])
    for name, (every, evaluator) in evaluators.items():
        assert every == values["evals"][name]["every_steps"]
        metrics = evaluator.run(params)
        counts = [v for k, v in metrics.items() if k.endswith("examples")]
        assert counts == [examples], (name, metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics


def test_classify_reads_fashion_mnist_from_the_given_data_dir():
    values = load_config("configs/classify.py:data_dir=/data/fmnist").to_dict()
    assert values["input"]["source"]["data_dir"] == "/data/fmnist"
    sources = [block["input"]["source"] for block in values["evals"].values()]
    assert sources and all(source["data_dir"] == "/data/fmnist" for source in sources)


MATCHED = {
    "demo": "configs/demo.py:",
    "clip_hetxl": "configs/clip_hetxl.py:",
    "lit_hetxl": "configs/lit_hetxl.py:",
    "pretrain": "configs/pretrain.py:files=x.tfrecord,",
}


@pytest.mark.parametrize("name", sorted(MATCHED))
def test_matched_baselines_differ_from_hetxl_only_in_the_noise(name):
    """With one temperature parameterisation for all, "HET-XL - baseline" changes nothing but
    the noise (and the loss that samples it; SigLIP adds its bias). grad_norm_groups only
    chooses what is logged: the noise group exists only where there is noise."""
    from flax.traverse_util import flatten_dict

    def flat(loss):
        spec = f"{MATCHED[name]}loss={loss},temperature=bounded_log"
        return flatten_dict(load_config(spec).to_dict(), sep=".")

    hetxl = flat("hetxl")
    # SigLIP keeps its own start (tau 0.1 with bias -10), as its paper pairs them.
    noise = ("model.noise", "loss.", "grad_norm_groups.noise")
    siglip = (*noise, "model.bias", "model.temperature.init")
    allowed = {"clip": noise, "siglip": siglip}
    for loss, prefixes in allowed.items():
        other = flat(loss)
        differing = {k for k in hetxl.keys() | other.keys() if hetxl.get(k) != other.get(k)}
        assert differing and all(k.startswith(prefixes) for k in differing), (loss, differing)
        assert other["model.temperature.mode"] == "bounded_log"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_pod_config_validates_as_a_baseline(loss):
    values = validate_config(load_config(f"configs/clip_hetxl.py:loss={loss}"))
    assert values["loss"]["name"] == loss and values["model"]["noise"] is None


@pytest.mark.parametrize(
    "arg, mode, start",
    [
        ("", "bounded", 2.525),  # the paper's sigmoid-linear tau, mid-range
        ("temperature=bounded_log", "bounded_log", 0.5),  # sigmoid on log tau: geometric middle
        ("temperature=bounded_log,tau_init=2.525", "bounded_log", 2.525),
        ("tau_init=1.0", "bounded", 1.0),
    ],
)
def test_classify_parameterises_and_starts_the_learned_temperature(arg, mode, start):
    from models.heteroscedastic import Temperature, TemperatureConfig

    values = load_config(f"configs/classify.py:head=hetxl,{arg}").to_dict()
    config = TemperatureConfig(**values["model"]["temperature"])
    assert (config.mode, config.lo, config.hi) == (mode, 0.05, 5.0)
    module = Temperature(config)
    tau = module.apply(module.init(jax.random.PRNGKey(0)))
    assert float(tau) == pytest.approx(start, rel=1e-5)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("head=hetxl,temperature=log_scale", "use bounded or bounded_log"),
        ("head=det,tau_init=1.0", "only head=hetxl without tau"),
        ("head=hetxl,tau=1.0,tau_init=2.0", "only head=hetxl without tau"),
    ],
)
def test_classify_refuses_a_temperature_it_cannot_learn(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(f"configs/classify.py:{arg}")
