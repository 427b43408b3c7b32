"""Two real processes on 127.0.0.1: disjoint shares whose union is the dataset, global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from data.tfrecords import encode_example
from tests.data.helpers import encode_image, labelled_image

REPO = Path(__file__).resolve().parents[2]
N = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_halves_of_the_dataset(tmp_path):
    import tensorflow as tf

    for shard in range(4):
        with tf.io.TFRecordWriter(str(tmp_path / f"pairs-{shard}.tfrecord")) as writer:
            for i in range(shard, N, 4):
                writer.write(encode_example(encode_image(labelled_image(i)), f"caption {i}"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "TF_CPP_MIN_LOG_LEVEL": "3"}
    port = free_port()
    # 8 records per process at 4 per process per batch: 2 batches are one epoch of each share.
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.data.multiprocess_worker", str(p), "2", str(port),
             str(tmp_path / "pairs-*.tfrecord"), "2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in range(2)
    ]
    reports = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=90)
        finally:
            worker.kill()
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))

    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in reports)
    local = [set(r["local"]) for r in reports]
    assert [len(r["local"]) for r in reports] == [8, 8]
    assert not local[0] & local[1]
    assert local[0] | local[1] == set(range(N))
    # Both processes see the same global batches, made of both processes' rows.
    assert reports[0]["gathered"] == reports[1]["gathered"]
    assert sorted(reports[0]["gathered"]) == list(range(N))
