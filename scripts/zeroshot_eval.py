"""Zero-shot classification, calibration and retrieval of a trained run, on any dataset.

    python -m scripts.zeroshot_eval --workdir DIR [--step N] [--eval NAME]
    python -m scripts.zeroshot_eval --workdir DIR --dataset NAME [--data_dir D] [--split S]
        [--classnames FILE] [--templates clip80|FILE] [--mc_samples S] [--batch_size B]
        [--json [OUT]] [--plot PNG]
    python -m scripts.zeroshot_eval --workdir DIR --retrieval --dataset tfrecord:GLOB|fashion_mnist
        [--max_pairs N] [--json [OUT]]

Restores the run's parameters (the latest checkpoint, or --step) with the config saved in the
workdir. Without --dataset it runs the run's own zero-shot evaluator (the first one, or --eval
NAME); with --dataset any checkpoint is evaluated on any dataset (contrastive/evaluators/
datasets.py: fashion_mnist, imagenet2012, imagenet_v2, tfds:NAME, folder:DIR), preprocessed at
the model's image size, prompts tokenized as the run's captions. Reports top-1/top-5 (and per
class), NLL, ECE and Brier score of the softmax over classes at the learned temperature; with
--mc_samples S also of the HET-XL prediction averaged over S noise samples. --retrieval reports
Recall@1/5/10 in both directions on image-caption pairs instead.

--classnames FILE: one class name per line, in label order. --templates FILE: one prompt
template per line, "{c}" where the class name goes; "clip80" is CLIP's 80 ImageNet templates.
--json prints the report as JSON; --json OUT writes it to OUT (a local path or URL).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from scripts import distributed, terminal

# jax, TensorFlow and the project's packages are imported where used, after main has parsed its
# flags and silenced their start-up logs (scripts/terminal.py); --help loads none of them.
if TYPE_CHECKING:
    from contrastive.trainer import TrainedRun, TrainResult

DEFAULT_BATCH_SIZE = 256
# Per-class rows printed in the table; larger datasets keep them in the JSON report only.
MAX_TABLE_CLASSES = 100


def evaluate(
    workdir: str,
    step: int | None = None,
    name: str | None = None,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    mc_samples: int = 0,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Zero-shot report of the run in workdir: on `dataset` if given, else with its own
    zero-shot evaluator `name` (default: the first). classnames / templates replace the
    dataset's. Keys: "step", "dataset", "classes", "templates" (their number), and the
    metrics of ZeroShotEvaluator.evaluate ("top1", "top5", "nll", "ece", "brier",
    "num_examples", "per_class_top1", "per_class_examples", "reliability", "mc_*")."""
    from contrastive.evaluators.build import build_evaluator, zeroshot_texts
    from contrastive.evaluators.datasets import classification_dataset
    from contrastive.evaluators.inputs import eval_input, label_eval_pp

    # The dataset is resolved first: a bad name fails before the checkpoint is read.
    spec = None if dataset is None else classification_dataset(dataset, data_dir, split)
    run = _contrastive_run(workdir, step)
    if spec is None:
        name, block, label = _own_zeroshot_block(run.values.get("evals"), name)
        block = dict(block)
        if batch_size is not None:
            block["input"] = {**block["input"], "batch_size": batch_size}
    else:
        label, name = spec.name, "--dataset"
        image_size = run.values["model"]["image_size"]
        batch = batch_size or _default_batch_size(run)
        block = dict(
            kind="zeroshot",
            every_steps=1,
            classnames=spec.classnames,
            templates=spec.templates,
            input=eval_input(spec.source, label_eval_pp(image_size, spec.crop), batch),
        )
    if classnames is not None:
        known = zeroshot_texts(block)[0]
        if len(known) != len(classnames):
            raise ValueError(
                f"{len(classnames)} class names given, the dataset has {len(known)} classes"
            )
        block["classnames"] = classnames
    if templates is not None:
        block["templates"] = templates
    values = run.values
    block["monte_carlo"] = mc_samples > 0
    if mc_samples:
        values = {
            **values,
            "sampling": {**(values.get("sampling") or {}), "eval_samples": mc_samples},
        }
    evaluator = build_evaluator(name, block, values, run.task.model, run.mesh)
    return _report(block, label, run.step, evaluator.evaluate(run.params))


def report_of_training(evals: Mapping[str, Any], result: TrainResult) -> dict[str, Any] | None:
    """What `evaluate(workdir)` would report (the run's first zero-shot evaluator, its last
    step), taken from the trainer's own evaluation at the last step: the same evaluation of the
    same parameters. None when the trainer did not evaluate there (a resumed run with nothing
    left to train). evals: the config's evaluator blocks."""
    name, block, label = _own_zeroshot_block(evals, None)
    if name not in result.evaluations:
        return None
    return _report(block, label, result.step, result.evaluations[name])


def _report(block: Mapping[str, Any], label: str, step: int, metrics: Mapping[str, Any]):
    from contrastive.evaluators.build import zeroshot_texts

    used_classnames, used_templates = zeroshot_texts(block)
    return {
        "step": step,
        "dataset": label,
        "classes": used_classnames,
        "templates": len(used_templates),
        **metrics,
    }


def evaluate_retrieval(
    workdir: str,
    dataset: str,
    step: int | None = None,
    *,
    data_dir: str | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    max_pairs: int | None = None,
) -> dict[str, Any]:
    """Recall@1/5/10 of the run in workdir on image-caption pairs: {"step", "dataset",
    "image_to_text_r1", ..., "text_to_image_r10", "num_pairs"}."""
    from contrastive.evaluators.build import build_evaluator, training_text_encoding
    from contrastive.evaluators.datasets import caption_dataset
    from contrastive.evaluators.inputs import caption_eval_pp, eval_input

    spec = caption_dataset(dataset, data_dir, split)
    run = _contrastive_run(workdir, step)
    text = training_text_encoding(run.values)
    pp = caption_eval_pp(
        run.values["model"]["image_size"], text.length, text.tokenizer, text.add_eos, spec.crop
    )
    block = dict(
        kind="retrieval",
        every_steps=1,
        input=eval_input(spec.source, pp, batch_size or _default_batch_size(run)),
    )
    if max_pairs is not None:
        block["max_pairs"] = max_pairs
    evaluator = build_evaluator("--retrieval", block, run.values, run.task.model, run.mesh)
    return {"step": run.step, "dataset": spec.name, **evaluator.evaluate(run.params)}


def _contrastive_run(workdir: str, step: int | None) -> TrainedRun:
    from contrastive.trainer import load_trained

    run = load_trained(workdir, step)
    if run.values["task"] != "contrastive":
        raise ValueError(f"{workdir} holds a {run.values['task']} run, not a two-tower model")
    return run


def _own_zeroshot_block(evals: Mapping[str, Any], name: str | None) -> tuple[str, dict, str]:
    """(name, block, the dataset label of reports) of the zero-shot evaluator `name` among the
    config's evaluator blocks, by default the first."""
    zeroshot = {n: b for n, b in (evals or {}).items() if b["kind"] == "zeroshot"}
    if not zeroshot:
        raise ValueError("the run has no zero-shot evaluator in its config: give --dataset")
    name = name or next(iter(zeroshot))
    if name not in zeroshot:
        raise ValueError(f"no zero-shot evaluator {name!r}; the config has {sorted(zeroshot)}")
    return name, zeroshot[name], zeroshot[name].get("dataset") or name


def _default_batch_size(run: TrainedRun) -> int:
    """DEFAULT_BATCH_SIZE rounded up to a multiple of the devices and processes."""
    import jax

    unit = math.lcm(run.mesh.size, jax.process_count())
    return -(-DEFAULT_BATCH_SIZE // unit) * unit


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a text file (local path or URL), stripped."""
    from contrastive import storage

    lines = [line.strip() for line in storage.read_text(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} holds no lines")
    return lines


def read_templates(spec: str) -> list[str]:
    """CLIP's 80 ImageNet templates for "clip80", else a file of templates, each with "{c}"."""
    from data.zeroshot_texts import check_templates, clip_templates

    templates = clip_templates() if spec == "clip80" else read_lines(spec)
    check_templates(templates)
    return templates


def format_table(report: dict[str, Any]) -> str:
    """The per-class top-1 table (up to MAX_TABLE_CLASSES classes) and the summary metrics."""
    lines = [
        f"zero-shot {report['dataset']}: {report['num_examples']} images, "
        f"{len(report['classes'])} classes x {report['templates']} prompt templates "
        f"(step {report['step']})"
    ]
    if len(report["classes"]) <= MAX_TABLE_CLASSES:
        lines.append(f"{'class':<20} {'images':>7} {'top-1':>7}")
        for name, count, accuracy in zip(
            report["classes"], report["per_class_examples"], report["per_class_top1"], strict=True
        ):
            shown = "-" if accuracy is None else f"{accuracy:.3f}"
            lines.append(f"{name[:20]:<20} {count:>7} {shown:>7}")
    else:
        lines.append("(per-class accuracy: see the JSON report, --json)")
    for k in (1, 5):
        if f"top{k}" in report:
            lines.append(
                f"{f'all (top-{k})':<20} {report['num_examples']:>7} {report[f'top{k}']:>7.3f}"
            )
    lines.append(_calibration_line("softmax at tau", report, ""))
    if "mc_samples" in report:
        lines.append(_calibration_line(f"MC, {report['mc_samples']} samples", report, "mc_"))
    return "\n".join(lines)


def _calibration_line(title: str, report: dict[str, Any], prefix: str) -> str:
    return (
        f"{title}: top-1 {report[prefix + 'top1']:.4f}  NLL {report[prefix + 'nll']:.4f}  "
        f"ECE {report[prefix + 'ece']:.4f}  Brier {report[prefix + 'brier']:.4f}"
    )


def format_retrieval(report: dict[str, Any]) -> str:
    ks = sorted(int(key.rsplit("_r", 1)[1]) for key in report if key.startswith("image_to_text_r"))
    lines = [
        f"retrieval {report['dataset']}: {report['num_pairs']} pairs (step {report['step']})",
        f"{'':<14}" + "".join(f"{f'R@{k}':>8}" for k in ks),
    ]
    for direction, title in (
        ("image_to_text", "image -> text"),
        ("text_to_image", "text -> image"),
    ):
        lines.append(f"{title:<14}" + "".join(f"{report[f'{direction}_r{k}']:>8.4f}" for k in ks))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> str:
    """Reliability diagrams of the report: the softmax at tau and, with MC, the MC prediction."""
    from contrastive.evaluators.reliability import plot_reliability

    panels = {"softmax at tau": {"reliability": report["reliability"], "ece": report["ece"]}}
    if "mc_samples" in report:
        panels[f"HET-XL MC, {report['mc_samples']} samples"] = {
            "reliability": report["mc_reliability"],
            "ece": report["mc_ece"],
        }
    return plot_reliability(panels, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=terminal.non_negative_int, default=None)
    parser.add_argument("--eval", default=None, help="a zeroshot evaluator of the run's config")
    parser.add_argument("--dataset", default=None, help="see contrastive/evaluators/datasets.py")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir, IDX or image folder")
    parser.add_argument("--split", default=None)
    parser.add_argument("--classnames", default=None, help="file: one class name per line")
    parser.add_argument("--templates", default=None, help="clip80, or a file of templates")
    parser.add_argument(
        "--mc_samples", type=terminal.non_negative_int, default=0, help="HET-XL MC samples (0: off)"
    )
    parser.add_argument("--batch_size", type=terminal.positive_int, default=None)
    parser.add_argument("--retrieval", action="store_true", help="Recall@K on caption pairs")
    parser.add_argument("--max_pairs", type=terminal.positive_int, default=None)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT")
    parser.add_argument("--plot", default=None, metavar="PNG", help="reliability diagram")
    distributed.add_flags(parser)
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.plot and args.retrieval:
        parser.error("--plot draws reliability diagrams of zero-shot classification")
    terminal.quiet_libraries(args.verbose)
    distributed.initialize(args)  # before anything starts a jax backend
    import jax

    from contrastive import storage

    try:
        if args.retrieval:
            if args.dataset is None:
                raise ValueError("--retrieval needs --dataset tfrecord:GLOB or fashion_mnist")
            report = evaluate_retrieval(
                args.workdir,
                args.dataset,
                args.step,
                data_dir=args.data_dir,
                split=args.split,
                batch_size=args.batch_size,
                max_pairs=args.max_pairs,
            )
        else:
            report = evaluate(
                args.workdir,
                args.step,
                args.eval,
                dataset=args.dataset,
                data_dir=args.data_dir,
                split=args.split,
                classnames=read_lines(args.classnames) if args.classnames else None,
                templates=read_templates(args.templates) if args.templates else None,
                mc_samples=args.mc_samples,
                batch_size=args.batch_size,
            )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    if jax.process_index() == 0:  # one report per job
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            print(format_retrieval(report) if args.retrieval else format_table(report))
            if args.json:
                storage.write_text(args.json, text + "\n")
        if args.plot:
            plot(report, args.plot)
    return report


if __name__ == "__main__":
    sys.exit(terminal.run(main))
