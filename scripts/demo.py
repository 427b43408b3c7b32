"""The demo job: train the demo config on Fashion-MNIST, then print the zero-shot table and
write the curves to WORKDIR/curves.png.

    python -m scripts.demo [--workdir workdirs/demo] [--config configs/demo.py:loss=hetxl]
        [--config.a.b=value ...]

A workdir that already holds a finished run is not retrained (training resumes from its latest
checkpoint, which is the last step); the table and the plot are made again. On several processes
(scripts/distributed.py) all of them train and evaluate; process 0 prints and writes the files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from scripts import distributed, terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides

TARGET_TOP1 = 0.80


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdirs/demo")
    add_config_flag(parser, default="configs/demo.py")
    distributed.add_flags(parser)
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    terminal.quiet_libraries(args.verbose)
    distributed.initialize(args)  # before anything starts a jax backend
    # Imported after parsing: --help stays fast and the logging settings above apply.
    import jax

    from contrastive import storage
    from contrastive.trainer import train
    from scripts import zeroshot_eval

    config = load_config(args.config, overrides)
    start = time.perf_counter()
    result = train(config, args.workdir)
    train_minutes = (time.perf_counter() - start) / 60
    # The trainer evaluated the final parameters already; a run resumed with nothing left to
    # train evaluates its last checkpoint.
    report = zeroshot_eval.report_of_training(config.to_dict().get("evals"), result)
    if report is None:
        report = zeroshot_eval.evaluate(args.workdir)
    if jax.process_index() != 0:  # every process evaluated its share; process 0 reports
        return 0 if report["top1"] >= TARGET_TOP1 else 1
    print()
    print(zeroshot_eval.format_table(report))
    curves = storage.join(args.workdir, "curves.png")  # the trainer draws it at each evaluation
    summary = {
        "zeroshot_top1": report["top1"],
        "zeroshot_top5": report["top5"],
        "zeroshot_nll": report["nll"],
        "zeroshot_ece": report["ece"],
        "train_minutes": round(train_minutes, 2),
        "curves": curves,
    }
    storage.write_text(
        storage.join(args.workdir, "demo_summary.json"), json.dumps(summary, indent=2)
    )
    verdict = "meets" if report["top1"] >= TARGET_TOP1 else "is BELOW"
    print(
        f"\ntrained in {train_minutes:.1f} min; zero-shot top-1 {report['top1']:.3f} "
        f"{verdict} the {TARGET_TOP1:.2f} target; curves: {curves}"
    )
    return 0 if report["top1"] >= TARGET_TOP1 else 1


if __name__ == "__main__":
    sys.exit(terminal.run(main))
