"""Rank a run's image-caption pairs by how suspect they look: a CSV, and an AUC where known.

    python -m scripts.score_pairs --workdir RUN --files 'pairs-*.tfrecord' [--out CSV]
    python -m scripts.score_pairs --workdir RUN --train_data [--out CSV] [--json OUT]

Restores the run (its latest checkpoint, or --step) and scores every pair of the TFRecord shards
(--files: the converter's image / caption features) or of the run's own training source as its
config defines it (--train_data), read once in order, each against the other pairs of its batch
of --batch_size: the pair's deterministic image->text loss, and for a HET-XL model its
Monte-Carlo loss and row entropy and the trace of the image's predicted noise covariance
(contrastive/evaluators/pair_scores.py). Higher = more suspect. The CSV has a row per pair:
position (order read), label when the records have one, each score, and where the source knows
which captions it corrupted (Fashion-MNIST with label noise) its ledger: clean_label, corrupted,
flip_probability; the summary then gives each score's ROC AUC at finding the corrupted pairs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from scripts import terminal

DEFAULT_BATCH_SIZE = 256


def score_pairs(args: argparse.Namespace) -> dict:
    """Scores the pairs, writes the CSV, returns the summary."""
    import numpy as np

    from contrastive import storage
    from contrastive.evaluators.pair_scores import corruption_ledger, pair_scorer, roc_auc
    from contrastive.trainer import load_trained

    run = load_trained(args.workdir, args.step)
    if run.values["task"] != "contrastive":
        raise ValueError(f"{args.workdir} holds a {run.values['task']} run, not a two-tower model")
    if args.train_data:
        source = dict(run.values["input"]["source"])
    else:
        source = dict(name="tfrecord", files=args.files)
    # Fashion-MNIST is stored at the towers' size; other images are centre-cropped to it.
    crop = source["name"] != "fashion_mnist"
    scorer = pair_scorer(run.values, run.task.model, run.mesh, source, args.batch_size, crop)
    columns = scorer.score(run.params)
    count = len(columns["loss"])
    ledger = corruption_ledger(source) if args.train_data else None
    if ledger is not None:
        if count != len(ledger["label"]) or not np.array_equal(columns["label"], ledger["label"]):
            raise RuntimeError("the pairs were not read in the source's order: no ledger to join")
        columns.update({k: v for k, v in ledger.items() if k != "label"})
    names = ["position", *(k for k in columns if k not in scorer.score_names), *scorer.score_names]
    columns["position"] = np.arange(count)
    out = args.out or storage.join(args.workdir, "pair_scores.csv")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(names)
    for row in zip(*(columns[n] for n in names), strict=True):
        writer.writerow([f"{v:.6g}" if isinstance(v, np.floating) else v for v in row])
    storage.write_text(out, text.getvalue())
    summary = {"workdir": args.workdir, "step": run.step, "pairs": count, "csv": out}
    if ledger is not None:
        corrupted = ledger["corrupted"]
        summary["corrupted"] = int(corrupted.sum())
        summary["roc_auc"] = {n: roc_auc(columns[n], corrupted) for n in scorer.score_names}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a contrastive training workdir")
    pairs = parser.add_mutually_exclusive_group(required=True)
    pairs.add_argument("--files", help="TFRecord shards of pairs (glob, list or gs:// path)")
    pairs.add_argument("--train_data", action="store_true", help="the run's training source")
    parser.add_argument("--step", type=terminal.non_negative_int, default=None)
    parser.add_argument("--batch_size", type=terminal.positive_int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--out", default=None, help="the CSV (default: WORKDIR/pair_scores.csv)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the summary")
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    terminal.quiet_libraries(args.verbose)
    from contrastive import storage

    try:
        summary = score_pairs(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from error
    print(
        f"scored {summary['pairs']} pairs of {args.workdir} (step {summary['step']}) -> "
        f"{summary['csv']}"
    )
    for name, auc in summary.get("roc_auc", {}).items():
        print(f"  ROC AUC of {name:<12} at finding the {summary['corrupted']} corrupted: {auc:.4f}")
    if args.json:
        storage.write_text(args.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(terminal.run(main))
