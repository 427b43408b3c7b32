"""Curves of one run or several (loss, temperature, zero-shot accuracy, any logged metric) as a
PNG, from the rows of metrics.jsonl (contrastive/metric_logging.py).

The trainer draws WORKDIR/curves.png with `plot_curves`; scripts/plot.py overlays runs with
`plot_runs`. Both go through `curve_series` (what is drawn) and `curves_figure` (how).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from contrastive import storage

# The panels drawn when no metric is named, and titles of metrics the trainer logs.
DEFAULT_METRICS = ("loss", "tau", "zeroshot_top1")
TITLES = {
    "loss": "training loss",
    "tau": "temperature tau",
    "zeroshot_top1": "zero-shot top-1",
    "learning_rate": "learning rate",
    "grad_norm": "gradient norm",
}
PANELS_PER_ROW = 3

# {metric: {run label: (steps, values)}}, in the order drawn.
Series = dict[str, dict[str, tuple[list[int], list[float]]]]


def curve_series(
    runs: Mapping[str, Sequence[dict]], metrics: Sequence[str] | None = None
) -> Series:
    """Each metric's (steps, values) per run, from rows of metrics.jsonl ({"step": int, ...}).

    metrics None: those of DEFAULT_METRICS that any run logged. Steps where a metric is absent
    or null (non-finite when logged) are left out, as are runs that never logged it. A named
    metric that no run logged raises ValueError, listing the metrics the runs have.
    """
    logged = {key for rows in runs.values() for row in rows for key in row} - {"step"}
    if metrics is None:
        metrics = [key for key in DEFAULT_METRICS if key in logged]
        if not metrics:
            raise ValueError(f"no metric of {list(DEFAULT_METRICS)} in the rows")
    missing = [key for key in metrics if key not in logged]
    if missing:
        raise ValueError(f"no run logged {missing}; the runs have {sorted(logged)}")
    series: Series = {}
    for key in metrics:
        series[key] = {}
        for label, rows in runs.items():
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                series[key][label] = (list(steps), list(values))
    return series


def curves_figure(series: Series):
    """A matplotlib figure of one panel per metric (PANELS_PER_ROW to a row) and one line per
    run; lines are labelled, with a legend, when a label is not empty."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; chosen here, not at import
    import matplotlib.pyplot as plt

    columns = min(len(series), PANELS_PER_ROW)
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.5 * rows), squeeze=False)
    panels = axes.flatten()
    for axis, (key, lines) in zip(panels, series.items(), strict=False):
        for label, (steps, values) in lines.items():
            axis.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        axis.set_title(TITLES.get(key, key))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if any(lines):
            axis.legend(fontsize="small")
    for axis in panels[len(series) :]:
        axis.set_visible(False)
    return figure


def plot_runs(
    runs: Mapping[str, Sequence[dict]], path: str, metrics: Sequence[str] | None = None
) -> Series:
    """Overlays runs ({label: metrics.jsonl rows}) and writes the PNG to path (local or a bucket
    URL); returns the series drawn (see curve_series)."""
    series = curve_series(runs, metrics)
    save_figure(curves_figure(series), path)
    return series


def plot_curves(rows: Sequence[dict], path: str) -> str:
    """One run's panels of DEFAULT_METRICS present in rows (a metric absent everywhere is
    skipped); path may be a bucket URL. Returns path."""
    return save_figure(curves_figure(curve_series({"": rows})), path)


def save_figure(figure, path: str) -> str:
    """Writes a matplotlib figure as PNG to path (local or a bucket URL) and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(str(path), buffer.getvalue())
    return str(path)
