"""tools.dirty_data on a small set: the sets it writes hold the faults it claims (read back with
tf.train.Example and Pillow, independently of the pipeline), and the training input counts
exactly those."""

from __future__ import annotations

import collections
import io
import json
from pathlib import Path

import pytest
import tensorflow as tf
from PIL import Image

from tests.shared import once_per_session
from tools import dirty_data

RECORDS, BAD_FRACTION = 2000, 0.02
MAX_TEXT_BYTES = 4096  # configs/pretrain.py keeps the input default
# Per fault, the reason a reader of the data would give it.
REASON_OF_FAULT = {
    "truncated_image": "undecodable",
    "html_image": "undecodable",
    "empty_image": "empty_image",
    "empty_caption": "empty_text",
    "long_caption": "text_too_long",
    "non_utf8_caption": "text_not_utf8",
    "missing_field": "missing_field",
}


def classify(serialized: bytes) -> str:
    """The fault of one stored record, judged with tf.train.Example and Pillow."""
    features = tf.train.Example.FromString(serialized).features.feature
    if "image" not in features or "caption" not in features:
        return "missing_field"
    image = features["image"].bytes_list.value[0]
    text = features["caption"].bytes_list.value[0]
    if not image:
        return "empty_image"
    if not text.strip():
        return "empty_text"
    if len(text) > MAX_TEXT_BYTES:
        return "text_too_long"
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return "text_not_utf8"
    try:
        Image.open(io.BytesIO(image)).load()
    except (OSError, SyntaxError):  # truncated data, or no image format at all
        return "undecodable"
    return "good"


def read_back(pattern: str) -> collections.Counter:
    files = tf.io.gfile.glob(pattern)
    return collections.Counter(
        classify(raw) for raw in tf.data.TFRecordDataset(files).as_numpy_iterator()
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(exit status, workdir, report) of one run, shared by the tests of every worker."""

    def build(workdir):
        report_path = workdir / "report.json"
        argv = ["--records", str(RECORDS), "--bad_fraction", str(BAD_FRACTION), "--repeats", "2"]
        argv += ["--workdir", str(workdir), "--json", str(report_path), "--shards", "4"]
        status = dirty_data.main(argv)
        return dict(status=status, workdir=str(workdir), report=json.loads(report_path.read_text()))

    run = once_per_session(tmp_path_factory, "dirty_data", build)
    return run["status"], Path(run["workdir"]), run["report"]


def expected_counts() -> dict[str, int]:
    per_fault = round(RECORDS * BAD_FRACTION)
    counts = collections.Counter()
    for reason in REASON_OF_FAULT.values():
        counts[reason] += per_fault
    return dict(counts)


def test_the_written_sets_hold_the_faults_the_script_claims(small_run):
    _, workdir, report = small_run
    expected = expected_counts()
    assert expected == {
        "undecodable": 80,
        "empty_image": 40,
        "empty_text": 40,
        "text_too_long": 40,
        "text_not_utf8": 40,
        "missing_field": 40,
    }
    dirty = read_back(str(workdir / "dirty" / "pairs-*.tfrecord"))
    assert dirty == {"good": RECORDS - 7 * 40, **expected}
    assert read_back(str(workdir / "clean" / "pairs-*.tfrecord")) == {"good": RECORDS}
    assert report["injected"] == dict.fromkeys(REASON_OF_FAULT, 40)


def test_the_training_input_counts_exactly_what_was_injected(small_run):
    status, _, report = small_run
    assert status == 0
    assert report["counts_exact"] and report["problems"] == []
    assert {k: v for k, v in report["counted_skipped"].items() if v} == expected_counts()
    good = RECORDS - 7 * 40
    for result in report["passes"]:
        assert result["records"] == RECORDS
        if result["dataset"] == "dirty":
            assert result["rows"] == good
            assert {k: v for k, v in result["skipped"].items() if v} == expected_counts()
        else:
            assert result["rows"] == RECORDS and sum(result["skipped"].values()) == 0
    # Two rounds in alternating order: clean first, then dirty first.
    order = [(p["round_index"], p["dataset"]) for p in report["passes"]]
    assert order == [(0, "clean"), (0, "dirty"), (1, "dirty"), (1, "clean")]
    throughput = report["throughput"]
    for result in report["passes"]:
        assert result["good_per_cpu_s"] == pytest.approx(result["rows"] / result["cpu_seconds"])
    by_round = {
        r: {p["dataset"]: p["good_per_cpu_s"] for p in report["passes"] if p["round_index"] == r}
        for r in (0, 1)
    }
    ratios = [by_round[r]["dirty"] / by_round[r]["clean"] for r in (0, 1)]
    target_rate = throughput["good_per_cpu_s"]
    assert target_rate["ratio"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert throughput["within_target"] == (target_rate["ratio"] >= 0.95)


def test_a_fault_share_that_does_not_fit_is_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        dirty_data.main(["--bad_fraction", "0.2"])
    assert exit.value.code == 2
    assert "each of 7 faults" in capsys.readouterr().err
