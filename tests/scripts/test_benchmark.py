"""scripts.benchmark's loss command: one JSON object per loss (and per HET-XL sample count)."""

from __future__ import annotations

import json

import pytest

from scripts import benchmark


def test_loss_benchmark_prints_one_row_per_loss_and_sample_count(capsys):
    benchmark.main(
        ["loss", "--batch", "16", "--dim", "8", "--samples", "1", "3", "--factors", "2"]
        + ["--sample-chunk", "2", "--column-chunk", "8", "--repeats", "1", "--json"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(row["loss"], row["samples"]) for row in rows] == [
        ("clip", None),
        ("siglip", None),
        ("hetxl", 1),
        ("hetxl", 3),
    ]
    for row in rows:
        assert (row["batch"], row["dim"]) == (16, 8)
        assert row["step_ms"] > 0 and row["peak_bytes"] > 0


def test_loss_benchmark_rejects_a_batch_the_devices_do_not_divide():
    with pytest.raises(SystemExit, match="multiple of the 8 devices"):
        benchmark.main(["loss", "--batch", "12", "--dim", "8", "--repeats", "1"])
