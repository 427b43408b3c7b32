"""The trainer as a real two-process job on 127.0.0.1 (scripts.local_cluster, gloo collectives)
against the same job in one process: same losses, same parameters, same zero-shot numbers, and
checkpoints that move between the two layouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive.metric_logging import read_metrics
from contrastive.trainer import load_trained
from tests import REPO
from tests.data.helpers import make_fashion_dir
from tests.shared import once_per_session

STEPS = 10

# Four real training jobs (about two minutes on two cores): `make test-quick` skips them.
pytestmark = pytest.mark.slow

CONFIG = """
from configs import demo


def get_config(arg=None):
    # The demo's loss, optimizer, input and evaluator on a small generated Fashion-MNIST, for
    # {steps} steps, with its towers cut to one block: what is compared is how the work is split
    # over processes, and compiling the full towers three times would dominate the test.
    config = demo.get_config("data_dir={data_dir},batch=64")
    for tower in (config.model.image_tower, config.model.text_tower):
        tower.update(width=64, depth=1, mlp_dim=128, num_heads=1)
    config.model.image_tower.stem_channels = ()
    config.model.embed_dim = 32
    config.total_epochs = None
    config.total_steps = {steps}
    config.log_every = 1
    config.checkpoint.every_steps = 5
    config.checkpoint.keep = 4
    config.evals.zeroshot.every_steps = {steps}
    config.evals.zeroshot.input.batch_size = 64
    # Two templates instead of CLIP's 80: the same evaluator, a tenth of its text-tower work.
    config.evals.zeroshot.templates = ["a photo of a {{c}}.", "a drawing of a {{c}}."]
    return config
"""


def environment(devices: int) -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
    }


def start(command: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=environment(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def run(command: list[str], devices: int) -> str:
    return finish(start(command, devices))


def train_command(config: str, workdir) -> list[str]:
    return [sys.executable, "-m", "scripts.train", "--config", config, "--workdir", str(workdir)]


def two_processes(command: list[str]) -> list[str]:
    return [sys.executable, "-m", "scripts.local_cluster", "--processes", "2"] + [
        "--devices_per_process",
        "2",
        "--",
        *command,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 devices and 2 processes x 2 devices, the same 10 steps (run once per test
    session, shared by the tests of every worker)."""

    def build(root):
        make_fashion_dir(root / "fashion", n_train=640, n_test=100)
        config = root / "config.py"
        config.write_text(CONFIG.format(data_dir=root / "fashion", steps=STEPS))
        one = root / "one_process"
        two = root / "two_processes"
        # Both layouts at once: compilation is mostly single-threaded, so they share the cores.
        single = start(train_command(str(config), one), devices=4)
        double = start(two_processes(train_command(str(config), two)), devices=2)
        output = finish(double)
        finish(single)
        return dict(config=str(config), one=str(one), two=str(two), two_output=output)

    return once_per_session(tmp_path_factory, "layouts", build)


def losses(workdir) -> list[float]:
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    return [row["loss"] for row in rows]


def final_params(workdir):
    return jax.device_get(load_trained(workdir, step=STEPS).params)


def assert_params_close(a, b):
    """Every parameter array within 1e-5 relative (in norm), except attention key biases.

    A key bias adds the same amount to every logit of a query's softmax, so its exact gradient
    is zero and what it receives is round-off, which differs with the order of the all-reduce
    (in-process vs gloo); Adam divides that by its own tiny RMS and takes lr-sized steps of
    arbitrary sign. Those biases only have to stay at round-off scale in both runs.
    """
    leaves = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(leaves, jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:
            assert np.abs(x).max() < 1e-3 and np.abs(y).max() < 1e-3, name
            continue
        difference = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
        assert difference < 1e-5, (name, difference)


def test_two_processes_train_exactly_like_one(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert len(one) == STEPS
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert_params_close(final_params(runs["two"]), final_params(runs["one"]))
    # Every line of the job is labelled with the process that printed it; process 0 logs.
    assert "[0] step 10/10" in runs["two_output"]
    assert "[1] step 10/10" not in runs["two_output"]


def test_zero_shot_numbers_are_the_same_in_both_layouts(runs):
    one = [row for row in read_metrics(runs["one"]) if "zeroshot_top1" in row]
    two = [row for row in read_metrics(runs["two"]) if "zeroshot_top1" in row]
    assert [row["zeroshot_examples"] for row in one] == [100]
    for key in ("zeroshot_top1", "zeroshot_top5", "zeroshot_examples"):
        assert [row[key] for row in two] == [row[key] for row in one]
    # Calibration metrics: sums of per-example terms, so only round-off may differ.
    for key in ("zeroshot_nll", "zeroshot_ece", "zeroshot_brier"):
        np.testing.assert_allclose([row[key] for row in two], [row[key] for row in one], rtol=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process_and_continues_identically(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["two"], resumed)
    # Back to the middle of the run: drop the final checkpoint.
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    output = run(train_command(runs["config"], resumed), devices=4)
    assert "resumed from step 5" in output
    np.testing.assert_allclose(losses(resumed), losses(runs["one"]), rtol=1e-5)
    assert_params_close(final_params(resumed), final_params(runs["one"]))
