"""The demo job: train the demo config on Fashion-MNIST, then print the zero-shot table and
write the curves to WORKDIR/curves.png.

    python -m scripts.demo [--workdir workdirs/demo] [--config configs/demo.py:loss=hetxl]

A workdir that already holds a finished run is not retrained (training resumes from its latest
checkpoint, which is the last step); the table and the plot are made again.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from contrastive.metric_logging import read_metrics
from contrastive.report import plot_curves
from contrastive.trainer import train
from scripts import zeroshot_eval
from scripts.config_loader import load_config

TARGET_TOP1 = 0.80


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--config", default="configs/demo.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)

    start = time.perf_counter()
    train(load_config(args.config), args.workdir)
    train_minutes = (time.perf_counter() - start) / 60
    report = zeroshot_eval.evaluate(args.workdir)
    print()
    print(zeroshot_eval.format_table(report))
    curves = plot_curves(read_metrics(args.workdir), Path(args.workdir) / "curves.png")
    summary = {
        "zeroshot_top1": report["zeroshot_top1"],
        "zeroshot_top5": report["zeroshot_top5"],
        "train_minutes": round(train_minutes, 2),
        "curves": str(curves),
    }
    (Path(args.workdir) / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    verdict = "meets" if report["zeroshot_top1"] >= TARGET_TOP1 else "is BELOW"
    print(
        f"\ntrained in {train_minutes:.1f} min; zero-shot top-1 {report['zeroshot_top1']:.3f} "
        f"{verdict} the {TARGET_TOP1:.2f} target; curves: {curves}"
    )
    return 0 if report["zeroshot_top1"] >= TARGET_TOP1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
