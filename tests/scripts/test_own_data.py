"""The README's three commands for one's own captions: make_tfrecords, inspect_data, train with
configs/pretrain.py; and what a broken config looks like from the command line."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from contrastive.metric_logging import read_metrics
from scripts import inspect_data, make_tfrecords, train
from tests import REPO

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def write_caption_csv(root, count=24):
    """count JPEGs of a coloured square with a caption naming the colour, and captions.csv."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for index in range(count):
            colour = list(COLOURS)[index % len(COLOURS)]
            pixels = np.full((int(rng.integers(20, 40)), 30, 3), 255, np.uint8)
            pixels[5:15, 5:15] = COLOURS[colour]
            Image.fromarray(pixels).save(root / "img" / f"{index:03d}.jpg")
            writer.writerow([f"img/{index:03d}.jpg", f"a {colour} square on white"])


def test_own_captions_train_with_the_pretrain_config(tmp_path, capsys):
    write_caption_csv(tmp_path)
    prefix = tmp_path / "data" / "pairs"
    assert (
        make_tfrecords.main(
            [
                "--input",
                str(tmp_path / "captions.csv"),
                "--output",
                str(prefix),
                "--num_shards",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    files = f"{prefix}-*.tfrecord"
    assert f"files={files}" in capsys.readouterr().out

    small = f"configs/pretrain.py:files={files},val_files={files},batch=8,image=16,steps=4"
    small += ",text_length=8,eval_every=2,loss=hetxl,samples=2"
    assert inspect_data.main(["--config", small, "--batches", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shapes"]["image"] == [[8, 16, 16, 3], "float32"]
    assert report["shapes"]["text"] == [[8, 8], "int32"]

    workdir = tmp_path / "run"
    one_block = ["--config.model.image_tower.depth=1", "--config.model.text_tower.depth=1"]
    assert train.main(["--config", small, *one_block, "--workdir", str(workdir)]) == 0
    saved = json.loads((workdir / "config.json").read_text())
    # Shapes and vocabulary were derived from the op string and the MiniLM tokenizer.
    assert saved["model"]["image_size"] == 16 and saved["model"]["text_length"] == 8
    assert saved["model"]["text_tower"]["vocab_size"] == 30522
    rows = read_metrics(str(workdir))
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"])
    assert {"retrieval_image_to_text_r1", "retrieval_text_to_image_r1"} <= set(rows[-1])
    assert (workdir / "curves.png").exists()


def test_a_broken_config_is_one_line_per_problem_and_exit_status_2(tmp_path):
    command = [
        sys.executable,
        "-m",
        "scripts.train",
        "--workdir",
        str(tmp_path / "run"),
        "--config",
        "configs/bench_ti.py",
        "--config.model.text_tower.vocab_size=1000",
        "--config.sampling.train_samples=0",
        "--config.optim.lr=-1.0",
    ]
    # As a user runs it: without the test session's TensorFlow log level.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "error: invalid config (3 problems):"
    assert any("vocab_size=1000" in line for line in lines)
    assert any("sampling.train_samples=0" in line for line in lines)
    assert any("optim.lr" in line for line in lines)
    assert "Traceback" not in done.stderr and len(lines) == 4
    assert not (tmp_path / "run").exists()  # nothing was written
