"""Curves of a run (loss, temperature, zero-shot accuracy) as a PNG, from metrics.jsonl."""

from __future__ import annotations

import io
from collections.abc import Sequence

from contrastive import storage

PANELS = (
    ("loss", "training loss"),
    ("tau", "temperature tau"),
    ("zeroshot_top1", "zero-shot top-1"),
)


def plot_curves(rows: Sequence[dict], path: str) -> str:
    """One panel per metric of PANELS present in rows (a metric absent everywhere is skipped);
    path may be a bucket URL."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; chosen here, not at import
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in PANELS if any(key in row for row in rows)]
    if not panels:
        raise ValueError(f"no metric of {[key for key, _ in PANELS]} in the rows")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="o" if len(points) < 20 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def save_figure(figure, path: str) -> str:
    """Writes a matplotlib figure as PNG to path (local or a bucket URL) and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(str(path), buffer.getvalue())
    return str(path)
