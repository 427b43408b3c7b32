"""Run files on a filesystem that pathlib would mangle, and workdirs that a mistake cannot damage.

TF's in-memory `ram://` filesystem stands in for a bucket: pathlib turns "ram://b/run" into the
local relative path "ram:/b/run", exactly as it turns "gs://b/run" into "gs:/b/run". Orbax writes
array data only to local disks, gs:// or s3://, so checkpoints go to checkpoint.directory here.
"""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax.traverse_util import flatten_dict, unflatten_dict

from contrastive import storage
from contrastive.checkpoint import Checkpointer
from contrastive.experiment import build_model
from contrastive.metric_logging import MetricLogger, read_metrics
from contrastive.trainer import load_trained, train, warm_start
from contrastive.validation import validate_config
from data.config_blocks import ConfigError
from scripts.zeroshot_eval import evaluate
from tests.contrastive.test_trainer import contrastive_config, fashion_dir  # noqa: F401


def test_storage_reads_and_writes_urls_without_touching_local_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = "ram://bucket/storage-test"
    assert storage.join(base, "a", "b.txt") == "ram://bucket/storage-test/a/b.txt"
    assert storage.absolute(base) == base
    storage.write_text(storage.join(base, "a", "b.txt"), "hello")
    assert storage.read_text(storage.join(base, "a", "b.txt")) == "hello"
    assert not storage.exists(storage.join(base, "a", "b.txt.tmp"))
    assert tf.io.gfile.listdir(storage.join(base, "a")) == ["b.txt"]
    assert not os.path.exists(tmp_path / "ram:")


def test_metrics_file_grows_on_a_url_and_drops_a_torn_last_line():
    workdir = "ram://bucket/metrics-test"
    logger = MetricLogger(workdir, primary=True)
    logger.write(1, {"loss": 2.0})
    # Readable while the run is still writing (each write is flushed).
    assert read_metrics(workdir) == [{"step": 1, "loss": 2.0}]
    logger.write(2, {"loss": 1.0})
    logger.close()
    path = storage.join(workdir, "metrics.jsonl")
    storage.write_text(path, storage.read_text(path) + '{"step": 3, "lo')
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2]
    resumed = MetricLogger(workdir, resume_step=1, primary=True)
    resumed.close()
    assert read_metrics(workdir) == [{"step": 1, "loss": 2.0}]


def test_a_resume_killed_while_rewriting_the_metrics_keeps_their_history(tmp_path):
    rows = [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3, 4)]
    storage.write_text(
        str(tmp_path / "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in rows)
    )
    MetricLogger(str(tmp_path), resume_step=2, primary=True).close()
    assert read_metrics(str(tmp_path)) == rows[:2]
    assert not (tmp_path / "metrics_rewrite.jsonl").exists()
    # Killed after the old file was removed and before the kept rows were flushed again: the
    # rewrite copy still holds them.
    storage.write_text(str(tmp_path / "metrics_rewrite.jsonl"), json.dumps(rows[0]) + "\n")
    (tmp_path / "metrics.jsonl").write_text('{"st')
    assert read_metrics(str(tmp_path)) == rows[:1]
    # Rows logged after the rewrite completed are read from the file itself.
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in [rows[0], rows[2]])
    )
    assert read_metrics(str(tmp_path)) == [rows[0], rows[2]]


def test_checkpoints_refuse_a_scheme_orbax_cannot_write():
    with pytest.raises(ValueError, match="checkpoint.directory"):
        Checkpointer("ram://bucket/run/checkpoints")


def test_a_whole_run_its_resume_and_zero_shot_evaluation_on_a_url_workdir(
    fashion_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)
    workdir = "ram://bucket/run"
    config = contrastive_config(fashion_dir, "clip", steps=3)
    config.checkpoint.directory = str(tmp_path / "checkpoints")
    config.evals.zeroshot.every_steps = 3
    assert train(config, workdir).step == 3
    # A longer run of the same experiment resumes from the checkpoint.
    config.total_steps = 5
    result = train(config, workdir)
    assert result.step == 5 and not result.preempted
    assert [row["step"] for row in read_metrics(workdir)] == [2, 3, 4, 5]
    saved = json.loads(storage.read_text(storage.join(workdir, "config.json")))
    assert saved["total_steps"] == 5
    assert tf.io.gfile.isdir(storage.join(workdir, "tensorboard"))
    # Curves are redrawn at each evaluation, on the same filesystem.
    assert storage.read_bytes(storage.join(workdir, "curves.png")).startswith(b"\x89PNG")
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3, 5]

    report = evaluate(workdir)
    assert report["step"] == 5 and report["num_examples"] == 20
    assert load_trained(workdir).step == 5
    # Nothing landed in a local folder named after the scheme.
    assert not os.path.exists(tmp_path / "ram:")


def test_a_mistaken_resume_is_refused_and_leaves_the_run_intact(
    fashion_dir,  # noqa: F811
    tmp_path,
):
    config = contrastive_config(fashion_dir, "clip", steps=2)
    config.evals = {}
    train(config, tmp_path)
    before = (tmp_path / "config.json").read_text()

    other = contrastive_config(fashion_dir, "siglip", steps=2)
    other.evals = {}
    with pytest.raises(ConfigError) as error:
        train(other, tmp_path)
    message = str(error.value)
    assert "loss.name: 'clip' -> 'siglip'" in message and "new --workdir" in message
    assert (tmp_path / "config.json").read_text() == before
    assert load_trained(tmp_path).step == 2

    # The way out the message names: a new run that starts from this one's parameters.
    assert f"--config.init_from={tmp_path}" in message
    warm = contrastive_config(fashion_dir, "hetxl", steps=1)
    warm.evals = {}
    with warm.unlocked():
        warm.init_from = str(tmp_path)
    source = flatten_dict(jax.device_get(load_trained(tmp_path).params), sep="/")
    _, init_params = build_model(validate_config(warm))
    fresh = flatten_dict(jax.device_get(jax.jit(init_params)(jax.random.key(0))), sep="/")
    loaded = flatten_dict(warm_start(str(tmp_path))(unflatten_dict(fresh, sep="/")), sep="/")
    assert set(loaded) == set(fresh)
    for name, value in loaded.items():
        # Towers, projections and temperature come from the clip run; HET-XL noise is new.
        expected = source[name] if name in source else fresh[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert any(name not in source for name in loaded)  # the noise layers
    assert train(warm, tmp_path / "warm").step == 1
