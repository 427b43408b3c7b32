"""scripts.plot and contrastive.report: the lines drawn are the values written in each run's
metrics.jsonl, one panel per metric and one labelled line per run."""

from __future__ import annotations

import json

import pytest

from contrastive import report, storage
from scripts import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_A = [
    {"step": 1, "loss": 5.0, "tau": 0.07, "learning_rate": 0.001},
    {"step": 2, "loss": None, "tau": 0.06},  # a non-finite loss is logged as null
    {"step": 3, "loss": 3.5, "tau": 0.05, "zeroshot_top1": 0.25},
    {"step": 4, "loss": 3.0, "tau": 0.05, "zeroshot_top1": 0.5},
]
RUN_B = [
    {"step": 2, "loss": 4.0, "tau": 0.1},
    {"step": 4, "loss": 2.0, "tau": 0.2},
]


def write_run(workdir: str, rows: list[dict]) -> str:
    storage.write_text(
        storage.join(workdir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows)
    )
    return workdir


def label_of(line) -> str:
    """A line's label, "" for one drawn without (matplotlib names those "_child0", ...)."""
    label = line.get_label()
    return "" if label.startswith("_") else label


@pytest.fixture
def drawn(monkeypatch):
    """The panels of every figure saved: [{title: {label: (steps, values)}}], figure by figure."""
    figures = []
    save = report.save_figure

    def record(figure, path):
        figures.append(
            {
                axis.get_title(): {
                    label_of(line): (list(line.get_xdata()), list(line.get_ydata()))
                    for line in axis.get_lines()
                }
                for axis in figure.axes
                if axis.get_visible()
            }
        )
        return save(figure, path)

    monkeypatch.setattr(report, "save_figure", record)
    return figures


def test_overlays_the_runs_written_one_panel_per_metric(tmp_path, drawn, capsys):
    a = write_run(str(tmp_path / "runs" / "a"), RUN_A)
    b = write_run(str(tmp_path / "runs" / "b"), RUN_B)
    out = tmp_path / "curves.png"
    assert plot.main(["--workdir", a, b, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    (panels,) = drawn
    assert panels == {
        "training loss": {"a": ([1, 3, 4], [5.0, 3.5, 3.0]), "b": ([2, 4], [4.0, 2.0])},
        "temperature tau": {
            "a": ([1, 2, 3, 4], [0.07, 0.06, 0.05, 0.05]),
            "b": ([2, 4], [0.1, 0.2]),
        },
        "zero-shot top-1": {"a": ([3, 4], [0.25, 0.5])},
    }
    assert f"wrote {out}" in capsys.readouterr().out


def test_metrics_flag_chooses_the_panels(tmp_path, drawn):
    a = write_run(str(tmp_path / "a"), RUN_A)
    b = write_run(str(tmp_path / "b"), RUN_B)
    out = str(tmp_path / "lr.png")
    plot.main(["--workdir", a, b, "--out", out, "--metrics", "learning_rate, zeroshot_top1"])
    assert drawn == [
        {"learning rate": {"a": ([1], [0.001])}, "zero-shot top-1": {"a": ([3, 4], [0.25, 0.5])}}
    ]
    with pytest.raises(SystemExit, match=r"no run logged \['accuracy'\]"):
        plot.main(["--workdir", a, "--out", out, "--metrics", "loss,accuracy"])


def test_a_workdir_without_metrics_is_named(tmp_path):
    a = write_run(str(tmp_path / "a"), RUN_A)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"{tmp_path / 'empty'} has no metrics.jsonl"):
        plot.main(["--workdir", a, str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_bucket_workdirs_and_output(drawn):
    # TF's in-memory filesystem stands in for gs:// (contrastive/storage.py).
    a = write_run("ram://bucket/plot-test/a", RUN_A)
    out = "ram://bucket/plot-test/out/plot.png"
    assert plot.main(["--workdir", a, "--out", out, "--metrics", "loss"]) == 0
    assert storage.read_bytes(out)[:8] == PNG_MAGIC
    assert drawn == [{"training loss": {"a": ([1, 3, 4], [5.0, 3.5, 3.0])}}]


def test_default_output_is_plot_png_here_and_same_names_get_their_paths(
    tmp_path, monkeypatch, drawn
):
    first = write_run(str(tmp_path / "x" / "run"), RUN_A)
    second = write_run(str(tmp_path / "y" / "run"), RUN_B)
    monkeypatch.chdir(tmp_path)
    assert plot.main(["--workdir", first, second + "/", "--metrics", "tau"]) == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(drawn[0]["temperature tau"]) == [first, second]


def test_run_labels():
    assert plot.run_labels(["runs/clip", "gs://b/runs/hetxl/"]) == ["clip", "hetxl"]
    assert plot.run_labels(["a/run", "b/run", "c"]) == ["a/run", "b/run", "c"]


def test_the_trainers_curves_are_one_unlabelled_line_per_logged_default_metric(tmp_path, drawn):
    path = str(tmp_path / "curves.png")
    assert report.plot_curves(RUN_B, path) == path
    assert drawn == [
        {
            "training loss": {"": ([2, 4], [4.0, 2.0])},
            "temperature tau": {"": ([2, 4], [0.1, 0.2])},
        }
    ]
    with pytest.raises(ValueError, match="no metric of"):
        report.plot_curves([{"step": 1, "grad_norm": 1.0}], path)
