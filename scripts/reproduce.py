"""Reproduce one of the paper's claims at small scale, over several seeds, and judge it.

    python -m scripts.reproduce {contrastive,classification,temperature} --seeds 3 [--table]
        [--out results/] [--steps N] [--batch B] [--width W] [--depth D] [--embed_dim E]
        [--label_noise_model class|image] [--label_noise_confusable P] [--label_noise_other P]
        [--label_noise_rate P] [--skip_arms NAMES] [--taus 0.05,0.1,...]
        [--data_dir DIR] [--workdir DIR]

Trains every arm of the claim (contrastive/reproduction.py) once per seed with the normal
trainer on Fashion-MNIST whose training labels, and so captions, carry noise: set by the class
(the confusable garments flip more often) or by the individual image (images a weak image model
confuses flip more often, to the class they look like): data/label_noise.py. It then writes
OUT/<claim>.json (per-seed numbers, mean and std per arm, the verdict, the training trajectory
of seed 0) and OUT/<claim>.md (the table and verdict lines; --table prints it). Each run is the
config file plus overrides that `scripts.train` accepts as they are (the JSON holds the command
of each arm). Runs live in a temporary folder, or in --workdir (one folder per distinct run,
named by a digest of its settings), where a finished run is reused by any later invocation
that asks for the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts import terminal

REPO = Path(__file__).resolve().parents[1]


# Fixed temperatures the learned one is compared with: HET-XL's learned tau for
# classification is bounded in [0.05, 5].
TAU_GRID = "0.05,0.1,0.2,0.5,1,2,5"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("claim", choices=("contrastive", "classification", "temperature"))
    parser.add_argument(
        "--seeds", type=terminal.positive_int, default=3, help="seeds 0..N-1 per arm"
    )
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--out", default="results", help="folder of <claim>.json and .md")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) the runs here")
    parser.add_argument(
        "--steps", type=terminal.positive_int, default=300, help="training steps per run"
    )
    parser.add_argument(
        "--batch", type=terminal.positive_int, default=128, help="global batch size"
    )
    parser.add_argument("--width", type=terminal.positive_int, default=64, help="tower width")
    parser.add_argument("--depth", type=terminal.positive_int, default=2, help="tower blocks")
    parser.add_argument(
        "--embed_dim", type=terminal.positive_int, default=64, help="contrastive embedding size"
    )
    parser.add_argument(
        "--label_noise_model",
        choices=("class", "image"),
        default="class",
        help="training-label noise set by the class, or by the image (data/label_noise.py)",
    )
    parser.add_argument(
        "--label_noise_confusable",
        type=probability,
        default=None,
        help="class model: flip probability of T-shirt/top, Pullover, Coat and Shirt labels "
        "(default 0.4)",
    )
    parser.add_argument(
        "--label_noise_other",
        type=probability,
        default=None,
        help="class model: flip probability of the other classes' labels (default 0.05)",
    )
    parser.add_argument(
        "--label_noise_rate",
        type=probability,
        default=None,
        help="image model: mean flip probability over the training images (default 0.2)",
    )
    for name, meaning in (
        ("noise_scale_init", "initial diagonal noise scale d(x)"),
        ("noise_kernel_scale", "initial noise-layer kernel scale"),
    ):
        parser.add_argument(
            f"--{name}",
            type=float,
            default=None,
            help=f"contrastive HET-XL arm: its {meaning} (default: configs/demo.py's 0.01)",
        )
    parser.add_argument(
        "--skip_arms",
        default="",
        help="comma-separated arms of secondary comparisons to leave out (contrastive: "
        "siglip; classification: het)",
    )
    parser.add_argument(
        "--taus", default=TAU_GRID, help="fixed temperatures of the temperature claim"
    )
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.claim != "contrastive":
        given = [f"--{n}" for n in ("noise_scale_init", "noise_kernel_scale") if getattr(args, n)]
        if given:
            parser.error(f"{', '.join(given)} belong to the contrastive claim")
    class_options = ("label_noise_confusable", "label_noise_other")
    if args.label_noise_model == "image":
        given = [f"--{name}" for name in class_options if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} belong to --label_noise_model class")
        args.label_noise_confusable = args.label_noise_other = 0.0
        if args.label_noise_rate is None:
            args.label_noise_rate = 0.2
    else:
        if args.label_noise_rate is not None:
            parser.error("--label_noise_rate belongs to --label_noise_model image")
        args.label_noise_rate = 0.0
        for name, default in zip(class_options, (0.4, 0.05), strict=True):
            if getattr(args, name) is None:
                setattr(args, name, default)
    return args


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {value}")
    return value


def train_command(spec: str, overrides: list[str]) -> str:
    """The scripts.train command line of one run (its workdir left to the reader)."""
    words = ["python", "-m", "scripts.train", "--config", spec, "--workdir", "WORKDIR"]
    return shlex.join(words + [f"--config.{o}" for o in overrides])


def run_folder(workdir: Path, spec: str, overrides: list[str], seed: int) -> Path:
    """Where a run lives: named by a digest of its config and overrides, so that the same run
    asked for by two claims (classification's hetxl arm and temperature's learned one) is
    trained once and read by both."""
    digest = hashlib.sha256(json.dumps([spec, overrides]).encode()).hexdigest()[:12]
    return workdir / "runs" / f"seed{seed}-{digest}"


def run_once(
    spec: str, overrides: list[str], run_dir: Path, steps: int, claim: str
) -> tuple[dict, list[dict]]:
    """Trains one run (or resumes / reuses it in run_dir) and returns its metrics and its
    training trajectory (reproduction.trajectory). The trainer's own progress lines go to
    run_dir/train.log."""
    from contrastive.metric_logging import read_metrics
    from contrastive.reproduction import read_run_metrics, trajectory
    from contrastive.trainer import train
    from scripts.config_loader import load_config

    identity = {"config": spec, "overrides": overrides}
    marker = run_dir / "run.json"
    if marker.exists() and json.loads(marker.read_text()) != identity:
        raise SystemExit(
            f"error: {run_dir} holds a run with other settings; remove it or pick another --workdir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2))
    config = load_config(spec, overrides)
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        train(config, str(run_dir))
    rows = read_metrics(str(run_dir))
    return read_run_metrics(claim, rows, steps), trajectory(rows)


def count_parameters(spec: str, overrides: list[str]) -> int:
    """Parameters of the model a config builds (shapes only, nothing allocated)."""
    import jax

    from contrastive.experiment import build_model
    from contrastive.validation import validate_config
    from scripts import model_summary
    from scripts.config_loader import load_config

    _, init = build_model(validate_config(load_config(spec, overrides)))
    return model_summary.count(jax.eval_shape(init, jax.random.key(0)))


def extra_parameters(arms, overrides: list[str]) -> dict[str, dict[str, int]]:
    """{head: {"classes=K": parameters over the DET head at K classes}} for K = 10 and 1,000."""
    counts = {}
    for classes in (10, 1000):
        with_classes = [*overrides, f"model.num_classes={classes}"]
        total = {
            arm.name: count_parameters(
                str(REPO / arm.config_file) + ":" + arm.config_arg, with_classes
            )
            for arm in arms
        }
        for name, value in total.items():
            counts.setdefault(name, {})[f"classes={classes}"] = value - total["det"]
    return counts


def label_noise_report(settings) -> dict | None:
    """The training labels' noise of seed 0 per class (data/label_noise.noise_report), or None
    without noise."""
    import numpy as np

    from data import label_noise
    from data.fashion_mnist import LABEL_NAMES, FashionMnistSource

    source = FashionMnistSource(
        settings.data_dir,
        label_noise_model=settings.label_noise_model,
        label_noise_confusable=settings.label_noise_confusable,
        label_noise_other=settings.label_noise_other,
        label_noise_rate=settings.label_noise_rate,
        label_noise_seed=0,
    )
    if not np.any(source.flip_probabilities):
        return None
    return label_noise.noise_report(
        source.clean_labels, source.labels, source.flip_probabilities, LABEL_NAMES
    )


def run_claim(
    claim: str, settings, seeds: int, workdir: Path, skip_arms: tuple[str, ...] = ()
) -> dict:
    """Trains every arm of the claim for seeds 0..seeds-1 and returns the result document:
    settings, per-arm per-seed metrics with each run's wall time, mean/std, extra parameters
    (classification) and the judgement."""
    from contrastive import reproduction as rp

    arms = rp.arms(claim, settings, skip_arms)
    started = time.perf_counter()
    per_arm = {arm.name: {"per_seed": []} for arm in arms}
    total = len(arms) * seeds
    # Seeds outer, arms inner: a change in machine load falls on every arm alike.
    for seed in range(seeds):
        for arm in arms:
            overrides = rp.run_overrides(claim, arm, settings, seed)
            spec = str(REPO / arm.config_file) + ":" + arm.config_arg
            run_started = time.perf_counter()
            run_dir = run_folder(workdir, spec, overrides, seed)
            metrics, curve = run_once(spec, overrides, run_dir, settings.steps, claim)
            wall = time.perf_counter() - run_started
            per_arm[arm.name]["per_seed"].append({"seed": seed, **metrics, "wall_s": wall})
            if seed == 0:
                per_arm[arm.name]["trajectory_seed0"] = curve
            done = seed * len(arms) + arms.index(arm) + 1
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(
                f"[{done}/{total}] {claim} {arm.name} seed {seed}: {shown} ({wall:.0f} s)",
                flush=True,
            )
    for arm in arms:
        # Other seeds differ in seed, input.seed and input.source.label_noise_seed only.
        overrides = rp.run_overrides(claim, arm, settings, 0)
        per_arm[arm.name]["command_seed0"] = train_command(
            f"{arm.config_file}:{arm.config_arg}", overrides
        )
    parameters = None
    if claim == "classification":
        parameters = extra_parameters(arms, rp.run_overrides(claim, arms[0], settings, 0))
    summary = {name: rp.aggregate(arm["per_seed"]) for name, arm in per_arm.items()}
    return {
        "claim": claim,
        "seeds": seeds,
        "settings": dataclasses.asdict(settings),
        "noise_model": rp.NOISE_MODELS[settings.label_noise_model],
        "label_noise_seed0": label_noise_report(settings),
        "arms": per_arm,
        "summary": summary,
        "extra_parameters": parameters,
        "judgement": rp.judge(claim, summary, parameters),
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    terminal.quiet_libraries(args.verbose)
    import jax

    from contrastive import reproduction as rp

    settings = rp.Settings(
        steps=args.steps,
        batch=args.batch,
        width=args.width,
        depth=args.depth,
        embed_dim=args.embed_dim,
        label_noise_confusable=args.label_noise_confusable,
        label_noise_other=args.label_noise_other,
        label_noise_model=args.label_noise_model,
        label_noise_rate=args.label_noise_rate,
        noise_scale_init=args.noise_scale_init,
        noise_kernel_scale=args.noise_kernel_scale,
        data_dir=args.data_dir,
        tau_grid=tuple(float(t) for t in args.taus.split(",") if t),
    )
    skip = tuple(name for name in args.skip_arms.split(",") if name)
    try:
        rp.arms(args.claim, settings, skip)
    except ValueError as error:
        print(f"reproduce.py: error: argument --skip_arms: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="reproduce-"))
    if not jax.config.jax_compilation_cache_dir:
        # The seeds of an arm compile the same programs: each is compiled once.
        jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        result = run_claim(args.claim, settings, args.seeds, workdir, skip)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.claim}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = rp.markdown(result)
    (out / f"{args.claim}.md").write_text(table)
    if args.table:
        print(table)
    verdict = result["judgement"]["verdict"]
    wall = result["wall_s"]
    print(f"{args.claim}: {verdict} in {wall:.0f} s; wrote {out}/{args.claim}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(terminal.run(main))
