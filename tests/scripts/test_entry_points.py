"""Every entry point under scripts/ (and the developer tools under tools/): --help without loading
the heavy libraries, the config
override form in the help of those that take --config, no library start-up noise on a real
command, and the demo's main end to end on tiny settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from contrastive.metric_logging import read_metrics
from scripts import benchmark, demo, inspect_data, model_summary, train, zeroshot_eval
from tests import REPO
from tests.data.helpers import make_fashion_dir

SCRIPTS = (
    "train",
    "demo",
    "zeroshot_eval",
    "inspect_data",
    "model_summary",
    "benchmark",
    "train_tokenizer",
    "param_table",
    "plot",
    "local_cluster",
    "tpu_pod",
    "make_tfrecords",
    "reproduce",
    "score_pairs",
)
# Developer tooling (tools/README.md): run by CI and the tests, not by users.
TOOLS = ("mutation_check", "dirty_data", "chaos")
ENTRY_POINTS = tuple(f"scripts.{name}" for name in SCRIPTS) + tuple(
    f"tools.{name}" for name in TOOLS
)
# Importing any of these costs seconds (TensorFlow, XLA) or pulls them in.
HEAVY = ("jax", "tensorflow", "flax", "contrastive", "data", "models")
# Runs `python -m scripts.X ARGS` as runpy does for -m, then names the heavy modules it loaded.
PROBE = f"""
import runpy, sys
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
print("LOADED=" + ",".join(name for name in {HEAVY!r} if name in sys.modules))
sys.exit(code)
"""
NOISE_MARKERS = ("oneDNN", "cuda", "absl", "WARNING: All log messages", "I0000", "E0000", "W0000")


@pytest.mark.parametrize("folder, names", [("scripts", SCRIPTS), ("tools", TOOLS)])
def test_the_list_holds_every_module_with_a_main(folder, names):
    with_main = {
        path.stem
        for path in (REPO / folder).glob("*.py")
        if re.search(r"^def main\(", path.read_text(), re.MULTILINE)
    }
    assert with_main == set(names)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_0_without_loading_heavy_libraries(module):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "LOADED=", result.stdout[-500:]
    assert result.stderr == ""


@pytest.mark.parametrize(
    "main,argv",
    [
        (train.main, []),
        (demo.main, []),
        (inspect_data.main, []),
        (model_summary.main, []),
        (benchmark.main, ["step"]),
        (benchmark.main, ["loop"]),
    ],
)
def test_help_of_scripts_with_a_config_names_the_override_form(capsys, main, argv):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "--config.a.b=value" in out and "--config.total_steps" in out


def test_a_real_command_prints_no_library_start_up_noise(tmp_path):
    make_fashion_dir(tmp_path, n_train=32, n_test=8)
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, "-m", "scripts.inspect_data", "--batches", "2", "--json"]
    command += ["--config", f"configs/data_fashion_mnist.py:data_dir={tmp_path},batch_size=16"]
    command += ["--config.input.batch_size=8", "--config.input.shuffle_buffer", "8"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["examples"] == 16  # 2 batches of 8: the overrides won over the argument
    noisy = [line for line in result.stderr.splitlines() if any(m in line for m in NOISE_MARKERS)]
    assert noisy == []


def tiny_demo_overrides(hetxl: bool) -> list[str]:
    """--config.* overrides that shrink configs/demo.py to a 1-block, 32-wide model."""
    overrides = [
        f"--config.model.{tower}.{key}={value}"
        for tower in ("image_tower", "text_tower")
        for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))
    ]
    overrides += ["--config.model.image_tower.stem_channels=()"]  # plain patches: cheaper
    overrides += ["--config.model.embed_dim=16", "--config.evals.zeroshot.input.batch_size=8"]
    if hetxl:
        overrides += ["--config.model.noise.num_factors=2", "--config.sampling.train_samples=2"]
        overrides += ["--config.sampling.chunk_size=2"]
    return overrides


def test_demo_trains_evaluates_and_writes_its_summary(tmp_path, capsys):
    data, workdir = tmp_path / "fashion", tmp_path / "run"
    make_fashion_dir(data, n_train=64, n_test=16)
    argv = ["--workdir", str(workdir), "--config", f"configs/demo.py:data_dir={data},batch=16"]
    argv += tiny_demo_overrides(hetxl=True)
    # The demo's length is in epochs: a step count replaces it.
    argv += ["--config.total_steps", "2", "--config.log_every=1"]
    status = demo.main(argv)

    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["image_tower"]["width"] == 32 and saved["sampling"]["train_samples"] == 2
    assert saved["total_steps"] == 2 and "total_epochs" not in saved
    rows = read_metrics(str(workdir))
    assert [row["step"] for row in rows] == [1, 2]
    summary = json.loads((workdir / "demo_summary.json").read_text())
    # The table comes from the trainer's evaluation at step 2; evaluating the saved checkpoint
    # afresh gives the same report.
    assert summary["zeroshot_top1"] == pytest.approx(rows[-1]["zeroshot_top1"], abs=1e-6)
    fresh = zeroshot_eval.evaluate(str(workdir))
    assert fresh["step"] == 2
    assert summary["zeroshot_top1"] == pytest.approx(fresh["top1"], abs=1e-6)
    assert summary["zeroshot_nll"] == pytest.approx(fresh["nll"], rel=1e-5)
    assert summary["curves"] == str(workdir / "curves.png")
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert status == (0 if summary["zeroshot_top1"] >= demo.TARGET_TOP1 else 1)
    out = capsys.readouterr().out
    assert "zero-shot fashion_mnist: 16 images, 10 classes" in out
    assert f"zero-shot top-1 {summary['zeroshot_top1']:.3f}" in out
    assert zeroshot_eval.format_table(fresh) in out

    # Again on the finished run: nothing is trained, the last checkpoint is evaluated instead.
    assert demo.main(argv) == status
    assert [row["step"] for row in read_metrics(str(workdir))] == [1, 2]
    again = json.loads((workdir / "demo_summary.json").read_text())
    assert again["zeroshot_top1"] == pytest.approx(summary["zeroshot_top1"], abs=1e-6)
    assert zeroshot_eval.format_table(fresh) in capsys.readouterr().out
