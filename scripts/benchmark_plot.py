"""`benchmark plot`: the scaling curves of `benchmark head` and `benchmark loss` rows, as a PNG.

    python -m scripts.benchmark plot --head HEAD.json [--loss LOSS.json ...] --out scaling.png

Panels: step time and peak memory of each head (and of HET-XL's work floor) against the number
of classes K, one line per (head, S); with --loss, step time and peak memory of CLIP, HET-XL and
its floor against the global batch, one line per S. Log-log axes: a cost linear in K or in the
batch is a line of slope 1.
"""

from __future__ import annotations

from collections.abc import Sequence

MIB = 2**20


def head_series(rows: Sequence[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """{label: [(K, step ms, peak MiB), ...]} of head rows: one series per (head, S, form), and
    HET-XL's work floor per S (its time only: the floor's memory is not measured)."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        if row["step_ms"] is None:
            continue
        label = row["head"] if row["head"] == "det" else f"{row['head']} S={row['samples']}"
        series.setdefault(label, []).append(
            (row["classes"], row["step_ms"], row["peak_bytes"] / MIB)
        )
        if row.get("floor_ms") is not None:
            floor = f"floor S={row['samples']}"
            points = series.setdefault(floor, [])
            if row["classes"] not in [point[0] for point in points]:
                points.append((row["classes"], row["floor_ms"], float("nan")))
    return {label: sorted(points) for label, points in series.items()}


def loss_series(rows: Sequence[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """{label: [(global batch, step ms, peak MiB), ...]} of `benchmark loss` rows (several
    files, one per batch, may be concatenated)."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        label = row["loss"] if row["samples"] is None else f"{row['loss']} S={row['samples']}"
        series.setdefault(label, []).append((row["batch"], row["step_ms"], row["peak_bytes"] / MIB))
        if row.get("floor_ms") is not None:
            series.setdefault(f"floor S={row['samples']}", []).append(
                (row["batch"], row["floor_ms"], float("nan"))
            )
    return {label: sorted(points) for label, points in series.items()}


def scaling_figure(head_rows: Sequence[dict], loss_rows: Sequence[dict]):
    """The figure: a row of (time, memory) panels for the heads, and one for the losses."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("classes K", head_series(head_rows))]
    if loss_rows:
        panels.append(("global batch (classes of the contrastive loss)", loss_series(loss_rows)))
    figure, axes = plt.subplots(len(panels), 2, figsize=(12, 4.5 * len(panels)), squeeze=False)
    for (x_label, series), (time_axis, memory_axis) in zip(panels, axes, strict=True):
        for index, (label, points) in enumerate(series.items()):
            xs = [point[0] for point in points]
            style = dict(color=f"C{index % 10}", marker="o", label=label)  # same in both panels
            floor = label.startswith("floor")
            time_axis.plot(xs, [point[1] for point in points], "--" if floor else "-", **style)
            if not floor:
                memory_axis.plot(xs, [point[2] for point in points], **style)
        for axis, y_label in ((time_axis, "step ms"), (memory_axis, "peak MiB per device")):
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(x_label)
            axis.set_ylabel(y_label)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    return figure


def write_scaling_plot(head_rows: Sequence[dict], loss_rows: Sequence[dict], out: str) -> str:
    from contrastive.report import save_figure

    if not any(row["step_ms"] is not None for row in head_rows):
        raise SystemExit("error: --head: no timed rows to plot")
    return save_figure(scaling_figure(head_rows, loss_rows), out)
