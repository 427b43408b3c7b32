"""Overlays the curves of several runs: one panel per metric, one line per run.

    python -m scripts.plot --workdir runs/clip runs/hetxl gs://bucket/runs/siglip
        [--out plot.png] [--metrics loss,zeroshot_top1,learning_rate]

Reads each WORKDIR/metrics.jsonl (a local folder or a bucket URL); each line is labelled with its
workdir's name (the whole path where two names are the same). --metrics: any logged keys, comma
separated (default: those of loss, tau and zeroshot_top1 that a run logged). Writes a PNG to
--out, by default plot.png in the current folder; a bucket URL works too.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from collections.abc import Sequence

from scripts import terminal

DEFAULT_OUT = "plot.png"


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each workdir's last path component ("runs/clip/" -> "clip"), or its whole path where two
    workdirs share a name."""
    names = [posixpath.basename(workdir.rstrip("/")) or workdir for workdir in workdirs]
    return [
        name if names.count(name) == 1 else workdir
        for name, workdir in zip(names, workdirs, strict=True)
    ]


def metric_list(text: str) -> list[str]:
    metrics = [key.strip() for key in text.split(",") if key.strip()]
    if not metrics:
        raise argparse.ArgumentTypeError(f"expected metric names, comma separated, got {text!r}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", nargs="+", required=True, help="run folders or bucket URLs")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument(
        "--metrics",
        type=metric_list,
        default=None,
        help="comma-separated metric keys (default: loss,tau,zeroshot_top1, those logged)",
    )
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    terminal.quiet_libraries(args.verbose)
    # Imported after parsing: --help stays fast and the logging settings above apply.
    from contrastive import storage
    from contrastive.metric_logging import METRICS_FILE, read_metrics
    from contrastive.report import plot_runs

    workdirs = [storage.absolute(workdir) for workdir in args.workdir]  # "." has a name then
    runs = {}
    for label, workdir in zip(run_labels(workdirs), workdirs, strict=True):
        if not storage.exists(storage.join(workdir, METRICS_FILE)):
            raise SystemExit(f"error: {workdir} has no {METRICS_FILE}")
        rows = read_metrics(workdir)
        if not rows:
            raise SystemExit(f"error: {storage.join(workdir, METRICS_FILE)} holds no metrics")
        runs[label] = rows
    try:
        series = plot_runs(runs, args.out, args.metrics)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    runs_drawn = f"{len(runs)} run" + ("s" if len(runs) > 1 else "")
    print(f"wrote {args.out}: {', '.join(series)} of {runs_drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
