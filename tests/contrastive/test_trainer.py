"""The trainer end to end on tiny data the tests write: every method, resume, SIGTERM, non-finite
halt, config validation."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from contrastive import trainer
from contrastive.checkpoint import Checkpointer
from contrastive.metric_logging import read_metrics
from contrastive.trainer import train, validate_config
from data.config_blocks import ConfigError
from tests import REPO
from tests.data.helpers import make_fashion_dir

IMAGE, LENGTH, BATCH = 28, 12, 16


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    make_fashion_dir(root, n_train=64, n_test=20)
    return root


def tiny_tower(**extra):
    return dict(width=32, depth=1, mlp_dim=64, num_heads=2, **extra)


def fashion_input(data_dir, split, training, batch=BATCH, with_text=True):
    pp = f"decode|resize({IMAGE})|value_range(-1, 1)"
    # The Fashion-MNIST source always attaches a caption: tokenize it or drop it.
    pp += f"|tokenize(max_len={LENGTH}, model='minilm')" if with_text else "|drop('text')"
    block = dict(
        source=dict(name="fashion_mnist", data_dir=str(data_dir), split=split),
        pp=pp,
        batch_size=batch,
        shuffle_buffer=32 if training else 0,
        seed=0,
        prefetch=1,
    )
    if not training:
        block["num_epochs"] = 1
    return block


def contrastive_config(data_dir, loss="hetxl", steps=6):
    noise = dict(num_factors=2, diag_scale_init=0.02, kernel_init_scale=0.1)
    return ml_collections.ConfigDict(
        dict(
            task="contrastive",
            seed=0,
            input=fashion_input(data_dir, "train", True),
            model=dict(
                image_tower=dict(name="vit", patch_size=(14, 14), pool_type="gap", **tiny_tower()),
                text_tower=dict(
                    name="text_transformer",
                    vocab_size=30522,
                    max_len=LENGTH,
                    pool_type="last",
                    **tiny_tower(),
                ),
                embed_dim=16,
                noise=noise if loss == "hetxl" else None,
                temperature=dict(mode="bounded_log", init=0.1, lo=0.01, hi=1.0),
                bias_init=-2.0 if loss == "siglip" else None,
                image_size=IMAGE,
                text_length=LENGTH,
            ),
            loss={"name": loss, "column_chunk_size": 8},
            sampling=dict(train_samples=4, eval_samples=4, chunk_size=2),
            optim=dict(name="adamw", lr=1e-3, clip_norm=1.0, schedule=dict(name="cosine")),
            total_steps=steps,
            log_every=2,
            evals=dict(
                zeroshot=dict(
                    kind="zeroshot",
                    every_steps=3,
                    dataset="fashion_mnist",
                    input=fashion_input(data_dir, "test", False, batch=8, with_text=False),
                    tokenizer="minilm",
                    text_length=LENGTH,
                )
            ),
            mesh=dict(data=-1, fsdp=1),
            checkpoint=dict(every_steps=3, keep=2, async_save=True),
            max_nonfinite_in_a_row=3,
        )
    )


def classification_config(data_dir, head="hetxl"):
    return ml_collections.ConfigDict(
        dict(
            task="classification",
            seed=0,
            input=fashion_input(data_dir, "train", True, with_text=False),
            model=dict(
                image_tower=dict(name="vit", patch_size=(14, 14), pool_type="gap", **tiny_tower()),
                num_classes=10,
                head=head,
                noise=dict(num_factors=2),
                temperature=dict(mode="bounded", lo=0.05, hi=5.0),
                image_size=IMAGE,
            ),
            sampling=dict(train_samples=4, eval_samples=4, chunk_size=2),
            optim=dict(name="adamw", lr=1e-3),
            total_steps=4,
            log_every=2,
            evals=dict(
                accuracy=dict(
                    kind="classification",
                    every_steps=4,
                    input=fashion_input(data_dir, "test", False, batch=8, with_text=False),
                )
            ),
            checkpoint=dict(every_steps=4, keep=1, async_save=False),
        )
    )


@pytest.mark.parametrize("loss", ["clip", "siglip", "hetxl"])
def test_each_contrastive_method_trains_logs_evaluates_and_checkpoints(fashion_dir, tmp_path, loss):
    result = train(contrastive_config(fashion_dir, loss), tmp_path)
    assert result.step == 6 and not result.preempted
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [2, 3, 4, 6]  # log_every=2, evaluation at 3 and 6
    for row in rows:
        for key in ("loss", "tau", "examples_per_sec", "learning_rate", "grad_norm"):
            assert np.isfinite(row[key]), (key, row)
    evaluated = [row for row in rows if "zeroshot_top1" in row]
    assert [row["step"] for row in evaluated] == [3, 6]
    assert all(row["zeroshot_examples"] == 20 for row in evaluated)
    assert (tmp_path / "config.json").exists()
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3, 6]
    metadata = json.loads((tmp_path / "checkpoints" / "3" / "metadata" / "metadata").read_text())
    assert metadata["step"] == 3 and metadata["total_steps"] == 6
    # The full report of the evaluation at the last step comes back, the logged one.
    (name,) = result.evaluations
    report = result.evaluations[name]
    assert report["top1"] == pytest.approx(rows[-1]["zeroshot_top1"], abs=1e-7)
    assert sum(report["per_class_examples"]) == 20
    # A finished run resumes with nothing to train and evaluates nothing.
    assert train(contrastive_config(fashion_dir, loss), tmp_path).evaluations == {}


@pytest.mark.parametrize("head", ["det", "hetxl"])
def test_classification_trains_and_reports_accuracy_nll_ece(fashion_dir, tmp_path, head):
    result = train(classification_config(fashion_dir, head), tmp_path)
    assert result.step == 4
    last = read_metrics(tmp_path)[-1]
    assert 0 <= last["accuracy"] <= 1 and last["nll"] > 0 and 0 <= last["ece"] <= 1
    assert last["eval_examples"] == 20 and np.isfinite(last["tau"])


def test_sigterm_saves_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    fashion_dir, tmp_path
):
    config = contrastive_config(fashion_dir, "hetxl", steps=8)
    config.evals = {}
    config.checkpoint.every_steps = 100  # only SIGTERM and the end write checkpoints
    config.log_every = 1
    uninterrupted = tmp_path / "uninterrupted"
    train(config, uninterrupted)

    interrupted = tmp_path / "interrupted"
    (tmp_path / "config.py").write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--config",
            str(tmp_path / "config.py"),
            "--workdir",
            str(interrupted),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if any(row["step"] >= 2 for row in read_metrics(interrupted)):
            os.kill(process.pid, signal.SIGTERM)
            break
        time.sleep(0.2)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "preempted" in output
    stopped_at = Checkpointer(interrupted / "checkpoints").latest_step()
    assert stopped_at is not None and 2 <= stopped_at < 8, output

    result = train(config, interrupted)  # picks up the checkpoint and input position
    assert result.step == 8 and not result.preempted
    steps = [row["step"] for row in read_metrics(interrupted)]
    assert steps == list(range(1, 9))  # one uninterrupted-looking log
    reference = read_metrics(uninterrupted)
    np.testing.assert_allclose(
        [row["loss"] for row in read_metrics(interrupted)],
        [row["loss"] for row in reference],
        rtol=1e-6,
    )
    a = trainer.load_trained(uninterrupted, step=8, with_optimizer=True).state
    b = trainer.load_trained(interrupted, step=8, with_optimizer=True).state
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Evaluation reads the parameters alone, and they are the same ones.
    params_only = trainer.load_trained(interrupted, step=8).params
    for x, y in zip(jax.tree.leaves(params_only), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_updates_halt_the_run_and_checkpoints_stay_finite(fashion_dir, tmp_path):
    config = contrastive_config(fashion_dir, "clip", steps=10)
    config.evals = {}
    # tau = 1e-30 makes every logit overflow: each update is non-finite and skipped.
    config.model.temperature = dict(mode="fixed", init=1e-30)
    config.checkpoint.every_steps = 1
    with pytest.raises(FloatingPointError, match="3 non-finite updates in a row"):
        train(config, tmp_path)
    rows = read_metrics(tmp_path)
    # Every update was skipped: each log line (log_every=2) counts the two since the last one.
    assert [row["step"] for row in rows] == [2]
    assert [row["nonfinite"] for row in rows] == [2]
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert steps and max(steps) < 3


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(totl_steps=3), "totl_steps"),
        (lambda c: c.update(total_epochs=2), "exactly one of"),
        (lambda c: c["loss"].update(name="clap"), "clap"),
        (lambda c: c["input"].update(pp="decode|sharpen(3)"), "sharpen"),
        (lambda c: c["model"].update(embed_dims=3), "embed_dims"),
        (lambda c: c["evals"]["zeroshot"].update(kind="captioning"), "captioning"),
        (lambda c: c.update(log_every="often"), "log_every"),
        (lambda c: c["checkpoint"].update(keep="all"), "checkpoint.keep"),
    ],
)
def test_config_errors_name_the_culprit_before_anything_runs(fashion_dir, change, message):
    config = contrastive_config(fashion_dir).to_dict()  # a plain dict: no ConfigDict type checks
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_gradient_accumulation_reproduces_the_full_batch_run(fashion_dir, tmp_path):
    losses = {}
    for accum_steps in (1, 2):
        config = contrastive_config(fashion_dir, "clip", steps=3)
        config.evals = {}
        config.log_every = 1
        with config.unlocked():
            config.accum_steps = accum_steps
        train(config, tmp_path / str(accum_steps))
        losses[accum_steps] = [row["loss"] for row in read_metrics(tmp_path / str(accum_steps))]
    # Same negatives, same updates: the microbatched run follows the full-batch one.
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)
    assert len(losses[1]) == 3
