"""Two real processes on 127.0.0.1: disjoint shares whose union is the dataset, global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from data.tfrecords import encode_example
from tests import REPO
from tests.data.helpers import encode_image, labelled_image

N = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(
    folder: Path,
    bad_first: dict[int, list[bytes]] | None = None,
    bad_last: dict[int, list[bytes]] | None = None,
) -> str:
    """N good pairs over 4 files (file k holds k, k+4, ...); bad_first[k] goes at the top of file k,
    bad_last[k] at its bottom. Files are shared out whole: process 0 reads files 0 and 2,
    process 1 files 1 and 3."""
    import tensorflow as tf

    for shard in range(4):
        with tf.io.TFRecordWriter(str(folder / f"pairs-{shard}.tfrecord")) as writer:
            for record in (bad_first or {}).get(shard, []):
                writer.write(record)
            for i in range(shard, N, 4):
                writer.write(encode_example(encode_image(labelled_image(i)), f"caption {i}"))
            for record in (bad_last or {}).get(shard, []):
                writer.write(record)
    return str(folder / "pairs-*.tfrecord")


def run_two_workers(files: str, batches: str, folder: Path) -> list[dict]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    port = free_port()
    reports = [folder / f"report-{p}.json" for p in range(2)]
    logs = [folder / f"worker-{p}.log" for p in range(2)]
    workers = []
    for p in range(2):
        with open(logs[p], "w") as log:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.data.multiprocess_worker", str(p), "2"]
                    + [str(port), files, batches, str(reports[p])],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    # A hang guard, not a speed test: a pass takes about 20 s, but once took over 90 s while
    # the other test workers' jobs shared the two cores; a real hang still fails here.
    deadline = time.monotonic() + 240
    try:
        for worker in workers:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    # Both logs on failure: one process's error is the likely cause of the other's hang.
    codes = [worker.returncode for worker in workers]
    assert codes == [0, 0], "\n".join(f"{log}:\n{log.read_text()[-3000:]}" for log in logs)
    return [json.loads(path.read_text()) for path in reports]


def test_two_processes_read_disjoint_halves_of_the_dataset(tmp_path):
    # 8 records per process at 4 per process per batch: 2 batches are one epoch of each share.
    reports = run_two_workers(write_shards(tmp_path), "2", tmp_path)
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in reports)
    local = [set(r["local"]) for r in reports]
    assert [len(r["local"]) for r in reports] == [8, 8]
    assert not local[0] & local[1]
    assert local[0] | local[1] == set(range(N))
    # Both processes see the same global batches, made of both processes' rows.
    assert reports[0]["gathered"] == reports[1]["gathered"]
    assert sorted(reports[0]["gathered"]) == list(range(N))


def test_skipped_counts_are_summed_over_processes(tmp_path):
    empty_text = encode_example(encode_image(labelled_image(0)), "")
    not_an_example = b"this is not a tf.train.Example"
    html = encode_example(b"<html><body>404</body></html>", "caption")
    # File 0 is process 0's, files 1 and 3 process 1's. The records at the bottom of file 3
    # come after process 1's last good record: only the end of the pass can count them.
    files = write_shards(
        tmp_path,
        bad_first={0: [empty_text], 1: [not_an_example]},
        bad_last={3: [not_an_example, html, empty_text]},
    )
    reports = run_two_workers(files, "all", tmp_path)
    # One full epoch: every good record arrives and every bad one has been read and counted.
    assert sorted(reports[0]["gathered"]) == list(range(N))
    local = [{k: v for k, v in r["skipped_local"].items() if v} for r in reports]
    assert local == [{"empty_text": 1}, {"empty_text": 1, "undecodable": 3}]
    for report in reports:
        assert report["skipped_total"]["empty_text"] == 2
        assert report["skipped_total"]["undecodable"] == 3
        assert sum(report["skipped_total"].values()) == 5
