"""scripts.reproduce: result files of tiny runs on fake Fashion-MNIST, the mean/std aggregation and
the verdict rules (never the accuracies themselves)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contrastive import reproduction as rp
from data.fashion_mnist import FashionMnistSource
from scripts import reproduce
from tests.data.helpers import make_fashion_dir

TINY = ["--seeds", "1", "--steps", "2", "--batch", "16", "--width", "32", "--depth", "1"]
TINY += ["--embed_dim", "16"]


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    make_fashion_dir(root, n_train=64, n_test=16)
    return root


def stats(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "n": len(values)}


def test_contrastive_runs_use_plain_vits_of_the_given_size(fashion_dir):
    # The README's contrastive table was measured with plain patch embeddings: the demo's
    # convolutional stem must not leak into the reproduction's towers.
    from scripts.config_loader import load_config

    settings = rp.Settings(
        steps=4,
        batch=16,
        width=32,
        depth=2,
        embed_dim=16,
        label_noise_confusable=0.4,
        label_noise_other=0.05,
        data_dir=str(fashion_dir),
        tau_grid=(1.0,),
    )
    for arm in rp.arms("contrastive", settings):
        spec = f"{arm.config_file}:{arm.config_arg}"
        config = load_config(spec, rp.run_overrides("contrastive", arm, settings, seed=0))
        image, text = config.model.image_tower, config.model.text_tower
        assert tuple(image.stem_channels) == (), arm.name
        assert (image.width, image.depth, text.width, text.depth) == (32, 2, 32, 2), arm.name


def test_aggregate_is_the_seed_mean_and_sample_std_of_each_metric():
    rng = np.random.default_rng(0)
    runs = [{"seed": s, "top1": rng.random(), "nll": rng.random(), "wall_s": 9.0} for s in range(4)]
    runs[2]["mc_top1"], runs[3]["mc_top1"] = 0.25, 0.75  # reported by some runs only
    summary = rp.aggregate(runs)
    assert set(summary) == {"top1", "nll", "mc_top1"}
    for key in ("top1", "nll"):
        values = [run[key] for run in runs]
        assert summary[key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert summary[key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert summary[key]["n"] == 4
    assert summary["mc_top1"] == pytest.approx(
        {"mean": 0.5, "std": np.std([0.25, 0.75], ddof=1), "n": 2}
    )
    assert rp.mean_std([0.3]) == (0.3, 0.0)


def test_verdicts_compare_the_gain_with_two_standard_errors_of_the_difference():
    a, b = [0.80, 0.82, 0.84], [0.70, 0.71, 0.72]
    se = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)
    better = rp.compare("top1", ("a", stats(a)), ("b", stats(b)), higher_is_better=True)
    assert better.verdict == rp.REPRODUCED
    assert better.gain == pytest.approx(0.11) and better.se == pytest.approx(se)
    worse = rp.compare("top1", ("b", stats(b)), ("a", stats(a)), higher_is_better=True)
    assert worse.verdict == rp.NOT_REPRODUCED
    # Lower is better for NLL: a's larger NLL loses.
    assert rp.compare("nll", ("a", stats(a)), ("b", stats(b)), False).verdict == rp.NOT_REPRODUCED
    close = [0.81, 0.83, 0.85]
    assert rp.compare("top1", ("a", stats(a)), ("c", stats(close)), True).verdict == rp.INCONCLUSIVE
    as_good = rp.compare("top1", ("a", stats(a)), ("c", stats(close)), True, as_good_as=True)
    assert as_good.verdict == rp.REPRODUCED
    assert rp.compare("top1", ("b", stats(b)), ("a", stats(a)), True, True).verdict == (
        rp.NOT_REPRODUCED
    )
    one_seed = {"mean": 0.9, "std": 0.0, "n": 1}
    assert rp.compare("top1", ("a", one_seed), ("b", stats(b)), True).verdict == rp.INCONCLUSIVE
    assert rp.overall([rp.REPRODUCED, rp.REPRODUCED]) == rp.REPRODUCED
    assert rp.overall([rp.REPRODUCED, rp.INCONCLUSIVE]) == rp.INCONCLUSIVE
    assert rp.overall([rp.INCONCLUSIVE, rp.NOT_REPRODUCED]) == rp.NOT_REPRODUCED


def test_temperature_verdict_compares_the_learned_tau_with_the_best_grid_point():
    summary = {
        "learned": {
            "accuracy": stats([0.80, 0.81, 0.82]),
            "nll": stats([0.50, 0.52, 0.54]),
            "tau": stats([1.0, 1.1, 1.2]),
        },
        "tau=0.1": {"accuracy": stats([0.70, 0.71, 0.72]), "nll": stats([0.49, 0.50, 0.51])},
        "tau=1": {"accuracy": stats([0.85, 0.86, 0.87]), "nll": stats([0.80, 0.81, 0.82])},
    }
    judgement = rp.judge("temperature", summary)
    accuracy, nll = judgement["primary"]
    assert accuracy["b"] == "best fixed tau=1" and accuracy["verdict"] == rp.NOT_REPRODUCED
    assert nll["b"] == "best fixed tau=0.1" and nll["verdict"] == rp.REPRODUCED
    assert judgement["verdict"] == rp.NOT_REPRODUCED
    assert "1.100 ± 0.100" in judgement["notes"][0]


def read_result(out, claim):
    result = json.loads((out / f"{claim}.json").read_text())
    table = (out / f"{claim}.md").read_text()
    assert table.strip().endswith(f"**Verdict ({claim}): {result['judgement']['verdict']}**")
    assert result["judgement"]["verdict"] == rp.INCONCLUSIVE  # one seed decides nothing
    assert result["settings"]["steps"] == 2 and result["seeds"] == 1
    return result, table


# Reported by the arms whose model has noise: its learned scale, the gradient reaching it.
NOISE_DIAGNOSTICS = ("noise_scale", "noise_grad")


def check_arms(result, arms, metrics):
    assert list(result["arms"]) == arms and list(result["summary"]) == arms
    for name in arms:
        (run,) = result["arms"][name]["per_seed"]
        assert run["seed"] == 0 and run["wall_s"] > 0
        assert set(run) - {"seed", "wall_s"} == set(metrics[name])
        for metric in metrics[name]:
            assert result["summary"][name][metric] == {"mean": run[metric], "std": 0.0, "n": 1}
        assert result["arms"][name]["command_seed0"].startswith("python -m scripts.train --config")


def test_classification_writes_per_seed_numbers_table_and_parameter_counts(
    fashion_dir, tmp_path, capsys
):
    argv = ["classification", *TINY, "--data_dir", str(fashion_dir), "--out", str(tmp_path)]
    assert reproduce.main([*argv, "--table"]) == 0
    result, table = read_result(tmp_path, "classification")
    quality = ("accuracy", "nll", "ece", "tau")
    noisy = quality + NOISE_DIAGNOSTICS
    check_arms(result, ["hetxl", "het", "det"], {"hetxl": noisy, "het": noisy, "det": quality})
    assert 0 <= result["summary"]["det"]["accuracy"]["mean"] <= 1
    assert result["summary"]["det"]["tau"]["mean"] == 1.0  # classify.py's fixed tau
    counts = result["extra_parameters"]
    assert counts["det"] == {"classes=10": 0, "classes=1000": 0}
    # HET-XL's extra parameters do not depend on the classes, HET's grow with them.
    assert counts["hetxl"]["classes=10"] == counts["hetxl"]["classes=1000"] > 0
    assert counts["het"]["classes=1000"] == 100 * counts["het"]["classes=10"]
    out = capsys.readouterr().out
    assert "| hetxl |" in out and "extra params (classes=1000)" in out
    assert "{T-shirt/top, Pullover, Coat, Shirt}" in result["noise_model"]


@pytest.mark.slow
def test_contrastive_reports_monte_carlo_metrics_for_hetxl_only(fashion_dir, tmp_path):
    argv = ["contrastive", *TINY, "--data_dir", str(fashion_dir), "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    result, table = read_result(tmp_path, "contrastive")
    deterministic = ("top1", "nll", "ece", "tau")
    mc = ("mc_top1", "mc_nll", "mc_ece")
    check_arms(
        result,
        ["hetxl", "clip", "siglip"],
        {
            "hetxl": deterministic + mc + NOISE_DIAGNOSTICS,
            "clip": deterministic,
            "siglip": deterministic,
        },
    )
    # Every arm trains with the same temperature parameterisation.
    commands = [arm["command_seed0"] for arm in result["arms"].values()]
    assert all("temperature=bounded_log" in command for command in commands)
    (primary,) = result["judgement"]["primary"]
    assert (primary["a"], primary["b"], primary["metric"]) == ("hetxl", "clip", "top1")
    clip_row = next(line for line in table.splitlines() if line.startswith("| clip |"))
    assert clip_row.count("—") == len(mc) + len(NOISE_DIAGNOSTICS)


@pytest.mark.slow
def test_temperature_reuses_finished_runs_of_its_workdir(fashion_dir, tmp_path, capsys):
    # One grid point: choosing the best of several is tested on given numbers above.
    argv = ["temperature", *TINY, "--taus", "0.5", "--data_dir", str(fashion_dir)]
    argv += ["--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert reproduce.main(argv) == 0
    first, _ = read_result(tmp_path / "out", "temperature")
    check_arms(
        first,
        ["learned", "tau=0.5"],
        dict.fromkeys(
            ["learned", "tau=0.5"], ("accuracy", "nll", "ece", "tau", *NOISE_DIAGNOSTICS)
        ),
    )
    assert first["summary"]["tau=0.5"]["tau"]["mean"] == pytest.approx(0.5)
    assert 0.05 < first["summary"]["learned"]["tau"]["mean"] < 5.0
    # The same command again reads the finished runs: the same numbers.
    assert reproduce.main(argv) == 0
    again, _ = read_result(tmp_path / "out", "temperature")
    assert again["summary"] == first["summary"]
    # Other settings in the same workdir get runs of their own rather than being mixed in.
    runs = sorted((tmp_path / "runs" / "runs").iterdir())
    assert len(runs) == 2
    assert reproduce.main([*argv, "--label_noise_other", "0.2"]) == 0
    assert set(runs) < set((tmp_path / "runs" / "runs").iterdir())
    assert len(list((tmp_path / "runs" / "runs").iterdir())) == 4


def test_noise_by_image_reaches_every_run_and_is_reported_per_class(fashion_dir, tmp_path):
    argv = ["classification", *TINY, "--data_dir", str(fashion_dir), "--out", str(tmp_path)]
    argv += ["--label_noise_model", "image", "--label_noise_rate", "0.3", "--skip_arms", "het"]
    assert reproduce.main(argv) == 0
    result, table = read_result(tmp_path, "classification")
    assert list(result["arms"]) == ["hetxl", "det"]
    for arm in result["arms"].values():
        assert "label_noise_model=image,label_noise_rate=0.3" in arm["command_seed0"]
    assert result["noise_model"].startswith("image-conditional")
    source = FashionMnistSource(
        str(fashion_dir), label_noise_model="image", label_noise_rate=0.3, label_noise_seed=0
    )
    report = result["label_noise_seed0"]
    assert report["all"]["flipped"] == pytest.approx(np.mean(source.labels != source.clean_labels))
    assert report["all"]["flip_probability_mean"] == pytest.approx(0.3)
    for row in report["classes"].values():
        assert row["flip_probability_std"] > 0  # the rate varies within every class
    assert "| all | 0.300 |" in table and "noise by image, rate 0.3" in table


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label_noise_rate", "0.2"], "--label_noise_rate belongs to --label_noise_model image"),
        (["--label_noise_model", "image", "--label_noise_other", "0.1"], "belong to"),
        (["--label_noise_rate", "1.5"], "must be a probability"),
        (["--noise_scale_init", "0.1"], "--noise_scale_init belong to the contrastive claim"),
    ],
)
def test_noise_flags_of_the_other_model_are_refused_while_parsing(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["classification", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_primary_arm_cannot_be_skipped(tmp_path):
    settings = rp.Settings(2, 16, 32, 1, 16, 0.4, 0.05, str(tmp_path), ())
    with pytest.raises(ValueError, match=r"cannot be left out .* optional arms: \['siglip'\]"):
        rp.arms("contrastive", settings, ("clip",))
    assert [arm.name for arm in rp.arms("contrastive", settings, ("siglip",))] == ["hetxl", "clip"]


def test_skipping_a_primary_arm_is_a_usage_error_before_any_run(tmp_path, capsys):
    workdir = tmp_path / "runs"
    code = reproduce.main(["contrastive", "--skip_arms", "clip", "--workdir", str(workdir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --skip_arms" in err and "optional arms: ['siglip']" in err
    assert not workdir.exists()  # refused before anything was created or trained
