"""Reliability diagrams: accuracy against confidence per bin, one panel per kind of prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contrastive.report import save_figure


def plot_reliability(panels: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Writes a PNG with one reliability diagram per panel, side by side; path may be a URL.

    Args:
      panels: {title: {"reliability": {"count", "accuracy", "confidence"} per bin (as in
        calibration.PredictionTotals.metrics()), "ece": float}}, e.g. "deterministic" and
        "MC, 16 samples".
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; chosen here, not at import
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("no reliability panel to plot")
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False, sharey=True
    )
    for axis, (title, panel) in zip(axes[0], panels.items(), strict=True):
        bins = panel["reliability"]
        num_bins = len(bins["count"])
        width = 1.0 / num_bins
        lefts = [b * width for b in range(num_bins)]
        # Empty bins (None) draw nothing. The vertical distance between a bin's bar and its
        # mean confidence is what the ECE averages, weighted by the bin's share of images.
        filled = [b for b in range(num_bins) if bins["count"][b]]
        axis.bar(
            [lefts[b] for b in filled],
            [bins["accuracy"][b] for b in filled],
            width=width,
            align="edge",
            edgecolor="black",
            label="accuracy",
        )
        axis.plot(
            [lefts[b] + width / 2 for b in filled],
            [bins["confidence"][b] for b in filled],
            "o",
            color="tab:red",
            markersize=4,
            label="mean confidence",
        )
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence")
        axis.set_title(f"{title}\nECE {panel['ece']:.4f}, {sum(bins['count'])} images")
        axis.legend(loc="upper left", fontsize="small")
    axes[0][0].set_ylabel("accuracy")
    return save_figure(figure, path)
