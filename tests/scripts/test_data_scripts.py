"""scripts.train_tokenizer and scripts.inspect_data end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import sentencepiece as spm
import tensorflow as tf

from scripts import inspect_data, train_tokenizer
from tests import REPO
from tests.data.helpers import encode_image, labelled_image, make_fashion_dir

FASHION_CONFIG = str(REPO / "configs" / "data_fashion_mnist.py")


def test_train_tokenizer_writes_a_pad_zero_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"a product shot of a {w} {i}"
            for i in range(40)
            for w in ("shoe", "bag", "coat", "dress")
        )
    )
    assert (
        train_tokenizer.main(
            ["--input", str(corpus), "--vocab_size", "30", "--output", str(tmp_path / "tok" / "sp")]
        )
        == 0
    )
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "sp.model"))
    assert processor.get_piece_size() == 30 and processor.pad_id() == 0
    assert processor.decode(processor.encode("a shoe")) == "a shoe"
    assert "pad id 0" in capsys.readouterr().out
    # This corpus cannot fill 1,000 pieces: a clear error, not a traceback.
    assert (
        train_tokenizer.main(
            [
                "--input",
                str(corpus),
                "--vocab_size",
                "1000",
                "--output",
                str(tmp_path / "tok" / "big"),
            ]
        )
        == 1
    )
    assert "Vocabulary size too high" in capsys.readouterr().err


def test_inspect_data_json_on_the_fashion_config(tmp_path, capsys):
    make_fashion_dir(tmp_path, n_train=64)
    config = f"{FASHION_CONFIG}:data_dir={tmp_path},batch_size=16"
    assert inspect_data.main(["--config", config, "--batches", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"batches", "examples", "examples_per_sec", "skipped"} <= set(report)
    assert report["batches"] == 3 and report["examples"] == 48
    assert report["examples_per_sec"] > 0
    assert report["skipped"] == {
        "missing_field": 0,
        "empty_image": 0,
        "empty_text": 0,
        "text_too_long": 0,
        "text_not_utf8": 0,
        "undecodable": 0,
    }
    assert report["shapes"] == {
        "image": [[16, 32, 32, 3], "float32"],
        "text": [[16, 20], "int32"],
        "label": [[16], "int32"],
    }
    # The input position a checkpoint stores is small whatever the shuffle buffer (10,000 here).
    assert 0 < report["state_bytes"] < 1024


def test_inspect_data_reports_skipped_records_as_text(tmp_path, capsys):
    from data.tfrecords import encode_example

    with tf.io.TFRecordWriter(str(tmp_path / "pairs.tfrecord")) as writer:
        for i in range(16):
            writer.write(encode_example(encode_image(labelled_image(i)), f"picture {i}"))
            if i % 4 == 0:
                writer.write(encode_example(b"corrupt", "broken image"))
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'input': {\n"
        f"        'source': {{'name': 'tfrecord', 'files': '{tmp_path}/pairs.tfrecord'}},\n"
        "        'pp': 'decode|resize(16)|value_range(-1, 1)|tokenize(max_len=8)',\n"
        "        'batch_size': 8, 'shuffle_buffer': 0}})\n"
    )
    assert inspect_data.main(["--config", str(config_file), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "image: float32[8, 16, 16, 3]" in out and "text: int32[8, 8]" in out
    assert "undecodable=4" in out  # 16 good records read, with 4 corrupt ones among them


def test_inspect_data_runs_as_a_module(tmp_path):
    make_fashion_dir(tmp_path, n_train=64)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [
        sys.executable,
        "-m",
        "scripts.inspect_data",
        "--batches",
        "2",
        "--json",
        "--config",
        f"{FASHION_CONFIG}:data_dir={tmp_path},batch_size=16",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["examples"] == 32 and report["devices"] == 1

    command[-1] = "no/such/config.py"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no config file no/such/config.py" in result.stderr
