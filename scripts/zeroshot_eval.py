"""Zero-shot accuracy of a trained run, with a per-class table.

    python -m scripts.zeroshot_eval --workdir workdirs/demo [--step N] [--eval NAME] [--json]

Restores the run's checkpoint (latest by default) with the config saved in the workdir and runs
its zero-shot evaluator (the first one, or --eval NAME) over the whole split.
"""

from __future__ import annotations

import argparse
import json

from contrastive.trainer import build_evaluators, load_trained
from data.zeroshot_texts import classnames_and_templates


def evaluate(workdir: str, step: int | None = None, name: str | None = None) -> dict:
    run = load_trained(workdir, step)
    zeroshot = {n: b for n, b in (run.values.get("evals") or {}).items() if b["kind"] == "zeroshot"}
    if not zeroshot:
        raise SystemExit(f"the run in {workdir} has no zero-shot evaluator in its config")
    name = name or next(iter(zeroshot))
    if name not in zeroshot:
        raise SystemExit(f"no zero-shot evaluator {name!r}; the config has {sorted(zeroshot)}")
    evaluators = build_evaluators({"evals": {name: zeroshot[name]}}, run.task, run.mesh)
    metrics = evaluators[name][1].run(run.state.params, per_class=True)
    classnames, templates = classnames_and_templates(zeroshot[name]["dataset"])
    return {
        "step": run.step,
        "dataset": zeroshot[name]["dataset"],
        "templates": len(templates),
        "classes": classnames,
        **metrics,
    }


def format_table(report: dict) -> str:
    lines = [
        f"zero-shot {report['dataset']}: {report['zeroshot_examples']} images, "
        f"{len(report['classes'])} classes x {report['templates']} prompt templates "
        f"(step {report['step']})",
        f"{'class':<20} {'images':>7} {'top-1':>7}",
    ]
    for name, count, accuracy in zip(
        report["classes"], report["per_class_examples"], report["per_class_top1"], strict=True
    ):
        lines.append(f"{name:<20} {count:>7} {accuracy:>7.3f}")
    lines.append(
        f"{'all (top-1)':<20} {report['zeroshot_examples']:>7} {report['zeroshot_top1']:>7.3f}"
    )
    if "zeroshot_top5" in report:
        lines.append(
            f"{'all (top-5)':<20} {report['zeroshot_examples']:>7} {report['zeroshot_top5']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--eval", default=None, help="name of a zeroshot evaluator in the config")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = evaluate(args.workdir, args.step, args.eval)
    print(json.dumps(report) if args.json else format_table(report))
    return report


if __name__ == "__main__":
    main()
