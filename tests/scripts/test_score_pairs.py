"""scripts.score_pairs end to end on tiny runs that scripts.train trains for 2 steps: the run's
own Fashion-MNIST training pairs with label noise by image (CSV, ledger, AUC), TFRecord pairs,
a CLIP run (no noise scores) and usage errors."""

import csv
import json

import numpy as np
import pytest

from contrastive.evaluators.pair_scores import roc_auc
from data.fashion_mnist import FashionMnistSource
from scripts import make_tfrecords, score_pairs, train
from tests.data.helpers import encode_image, make_fashion_dir
from tests.scripts.test_zeroshot_eval import CONFIG
from tests.shared import once_per_session

NOISE = dict(label_noise_model="image", label_noise_rate=0.3, label_noise_seed=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def build(root):
        make_fashion_dir(root / "fashion", n_train=48, n_test=10)
        config = root / "tiny.py"
        text = CONFIG.format(data_dir=str(root / "fashion"))
        noisy = text.replace(
            'source=dict(name="fashion_mnist", data_dir=DATA, split=split),',
            'source=dict(name="fashion_mnist", data_dir=DATA, split=split, '
            + "**(NOISE if training else {})),",
        ).replace("TOWER = ", f"NOISE = {NOISE!r}\nTOWER = ")
        assert noisy != text
        config.write_text(noisy)
        for loss in ("hetxl", "clip"):
            argv = ["--config", f"{config}:{loss}", "--workdir", str(root / loss)]
            assert train.main(argv) == 0
        rows = ["image,caption"]
        for i in range(5):
            pixels = np.full((16, 16, 3), 40 * i, np.uint8)
            (root / f"{i}.png").write_bytes(encode_image(pixels))
            rows.append(f"{i}.png,caption number {i}")
        (root / "pairs.csv").write_text("\n".join(rows) + "\n")
        argv = ["--input", str(root / "pairs.csv"), "--output", str(root / "pairs")]
        assert make_tfrecords.main(argv) == 0
        return {"root": str(root), "pairs": str(root / "pairs-*.tfrecord")}

    return once_per_session(tmp_path_factory, "score_pairs", build)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_pairs_are_scored_against_the_sources_ledger(runs, tmp_path, capsys):
    out, summary_path = tmp_path / "scores.csv", tmp_path / "summary.json"
    argv = ["--workdir", f"{runs['root']}/hetxl", "--train_data", "--out", str(out)]
    assert score_pairs.main([*argv, "--batch_size", "16", "--json", str(summary_path)]) == 0
    rows = read_csv(out)
    source = FashionMnistSource(data_dir=f"{runs['root']}/fashion", **NOISE)
    assert [int(r["position"]) for r in rows] == list(range(48))
    corrupted = np.array([r["corrupted"] == "True" for r in rows])
    np.testing.assert_array_equal(corrupted, source.labels != source.clean_labels)
    np.testing.assert_array_equal([int(r["label"]) for r in rows], source.labels)
    np.testing.assert_allclose(
        [float(r["flip_probability"]) for r in rows], source.flip_probabilities, rtol=1e-5
    )
    summary = json.loads(summary_path.read_text())
    assert summary["pairs"] == 48 and summary["corrupted"] == int(corrupted.sum())
    assert set(summary["roc_auc"]) == {"loss", "mc_loss", "mc_entropy", "noise_trace"}
    for name, auc in summary["roc_auc"].items():
        scores = np.array([float(r[name]) for r in rows])
        assert auc == pytest.approx(roc_auc(scores, corrupted), abs=1e-4), name
    # Each loss is -log of a probability over the 16 captions of its batch.
    losses = np.array([float(r["loss"]) for r in rows])
    assert np.all(losses > 0) and np.all(np.array([float(r["noise_trace"]) for r in rows]) > 0)
    assert "ROC AUC of noise_trace" in capsys.readouterr().out


def test_tfrecord_pairs_and_a_clip_run_get_the_deterministic_loss_only(runs, tmp_path):
    out = tmp_path / "scores.csv"
    argv = ["--workdir", f"{runs['root']}/clip", "--files", runs["pairs"], "--out", str(out)]
    assert score_pairs.main([*argv, "--batch_size", "8"]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["position", "loss"] and len(rows) == 5
    # A softmax over the 5 captions of the one batch: probabilities that sum to one.
    probabilities = np.exp(-np.array([float(r["loss"]) for r in rows]))
    assert np.all(probabilities < 1) and probabilities.sum() < 5


def test_usage_errors_say_what_to_change(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        score_pairs.main(["--workdir", f"{runs['root']}/hetxl"])  # neither --files nor --train_data
    assert "one of the arguments --files --train_data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="holds no config.json"):
        score_pairs.main(["--workdir", str(tmp_path), "--train_data"])
    with pytest.raises(SystemExit, match="match"):
        score_pairs.main(["--workdir", f"{runs['root']}/hetxl", "--files", str(tmp_path / "*.x")])
