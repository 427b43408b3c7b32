"""Kill training at random moments and check that resuming reproduces an uninterrupted run exactly.

    python -m tools.chaos --config configs/demo.py[:arg] --trials N [--seed S]
        [--kills_per_trial K] [--workdir_root DIR] [--json OUT] [--config.a.b=value ...]

First one uninterrupted reference run of `python -m scripts.train` with the config and overrides
given, then N trials. A trial runs the same command in a fresh workdir, kills it with SIGKILL
(nothing gets a chance to save) at a moment chosen at random, K times, then runs the command
again until it finishes. The kill moments cycle, over the trials, through three phases:

    checkpoint write  once the temporary directory of a checkpoint (<step>.orbax-checkpoint-tmp)
                      appears, a random fraction of the time the reference took to write it
    evaluation        after the progress line of an evaluation step, a random fraction of the
                      time the reference's evaluation took (its result line ends it)
    random time       a moment drawn uniformly from the first 90% of the reference's run
                      time, placed in the trial at the same distance after the same progress
                      line (or after the start, when it falls before the first one): runs
                      that load compiled programs from the cache start faster than the
                      reference, which compiled them

Checkpoint and evaluation steps are drawn from those still ahead of the step a run resumes
from. Whether each kill landed in its phase is checked when it is sent and shown.

Each finished trial is compared with the reference: every row of metrics.jsonl (each value but
examples_per_sec, a wall-clock rate) and every array of the final train state (parameters,
optimizer state, PRNG key, counters) must be equal bit for bit. A table shows each trial's kill
moments, the last step logged before each kill, the step the next run resumed from, and the
result; the exit status is 1 when a trial differs or did not finish.

Bit-for-bit equality is what a resume from the checkpointed state and input position gives on
CPU, where XLA's programs are deterministic. On GPUs some XLA reductions and scatters are not
unless XLA_FLAGS has --xla_gpu_deterministic_ops=true; without it, differences there need not
come from resuming (a second reference run would show them too).

All runs share one persistent compilation cache (JAX_COMPILATION_CACHE_DIR if set, else one
under the workdir root): the reference compiles, the trials load what it compiled. Without
--workdir_root the runs go to a temporary directory, removed when every trial matches.

The demo with tiny towers, 8 steps, checkpoints every 3 steps and an evaluation every 4 runs
`--trials 3` in about 7 minutes on two CPU cores shared with other work, most of it start-up
(about 30 s a run):

    python -m tools.chaos --trials 3 --config configs/demo.py:batch=16 \\
        --config.total_steps=8 --config.log_every=1 --config.checkpoint.every_steps=3 \\
        --config.evals.zeroshot.every_steps=4 --config.input.shuffle_buffer=256 \\
        --config.evals.zeroshot.input.batch_size=256 \\
        --config.model.image_tower.width=32 --config.model.image_tower.depth=1 \\
        --config.model.image_tower.mlp_dim=64 --config.model.image_tower.num_heads=2 \\
        --config.model.text_tower.width=32 --config.model.text_tower.depth=1 \\
        --config.model.text_tower.mlp_dim=64 --config.model.text_tower.num_heads=2 \\
        --config.model.embed_dim=16 --config.model.noise.num_factors=2 \\
        --config.sampling.train_samples=2 --config.sampling.chunk_size=2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from scripts import terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides
from tools.chaos_comparison import RunRecord, differences, read_run
from tools.chaos_trials import PHASES, Launcher, Timeline, Trial, run_trial

HUNG_AFTER_SECONDS = 600  # the least time a run gets before it counts as hung


def judge(trial: Trial, reference: RunRecord, workdir: Path) -> None:
    """Sets the trial's result: identical, DIFFERS (with the differences) or FAILED."""
    last = trial.runs[-1][1]
    if last.timed_out:
        trial.result = f"FAILED: no end after {last.seconds:.0f}s"
        trial.details = last.output[-5:]
        return
    if last.exit_code != 0:
        trial.result = f"FAILED: exit status {last.exit_code}"
        trial.details = last.output[-5:]
        return
    trial.details = differences(reference, read_run(workdir))
    trial.result = "DIFFERS" if trial.details else "identical"


def table(rows: list[list[str]]) -> str:
    header = ["trial", "kill moment (where it landed)", "step reached", "resumed from", "result"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def _seconds_by_step(seconds: dict[int, float]) -> str:
    return ", ".join(f"step {s} {t:.2f}s" for s, t in sorted(seconds.items())) or "none"


# ----------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flag(parser)
    parser.add_argument("--trials", type=terminal.positive_int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument(
        "--kills_per_trial",
        type=terminal.positive_int,
        default=1,
        help="SIGKILLs before a trial's last run",
    )
    parser.add_argument("--workdir_root", help="where the runs go (default: a temporary dir)")
    parser.add_argument("--json", help="also write the results to this file")
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    if args.workdir_root:
        root = Path(args.workdir_root)
        if (root / "reference").exists() or any(root.glob("trial_*")):
            parser.error(f"{root} already holds runs: give an empty or new --workdir_root")
    terminal.quiet_libraries(args.verbose)
    # Config mistakes are reported now, not after the reference run.
    checkpoint_block = load_config(args.config, overrides).get("checkpoint") or {}
    if checkpoint_block.get("directory"):
        parser.error("checkpoint.directory is set: every run needs its checkpoints in its workdir")
    return args, overrides


def make_launcher(config: str, overrides: list[str], root: Path) -> Launcher:
    path, colon, arg = config.partition(":")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-cache")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return Launcher(str(Path(path).resolve()) + colon + arg, overrides, env)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    started = time.monotonic()
    root = Path(args.workdir_root or tempfile.mkdtemp(prefix="chaos-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(args.config, overrides, root)

    print(f"reference run in {root / 'reference'}", flush=True)
    reference_run = launcher.run(root / "reference", None)
    if reference_run.exit_code != 0:
        print(f"error: the reference run failed (exit status {reference_run.exit_code}):")
        print("\n".join(reference_run.output[-5:]))
        return 1
    timeline = Timeline.of(reference_run)
    # Far longer than a resumed run needs: it hangs.
    launcher.timeout = max(HUNG_AFTER_SECONDS, 5 * reference_run.seconds)
    print(
        f"reference: {reference_run.seconds:.0f}s; checkpoint writes "
        f"{_seconds_by_step(timeline.checkpoint_writes)}; evaluations "
        f"{_seconds_by_step(timeline.evaluations)}",
        flush=True,
    )

    rng = random.Random(args.seed)
    trials = []
    for number in range(1, args.trials + 1):
        first = (number - 1) * args.kills_per_trial
        phases = [PHASES[(first + k) % len(PHASES)] for k in range(args.kills_per_trial)]
        workdir = root / f"trial_{number}"
        trials.append(trial := run_trial(number, phases, timeline, launcher, workdir, rng))
        print(f"trial {number}: {'; '.join(row[1] for row in trial.rows())}", flush=True)

    reference = read_run(root / "reference")
    for trial in trials:
        judge(trial, reference, root / f"trial_{trial.number}")
    print(table([row for trial in trials for row in trial.rows()]))
    for trial in trials:
        if trial.details:
            print(f"trial {trial.number}:\n" + "\n".join(f"  {line}" for line in trial.details))
    identical = sum(trial.result == "identical" for trial in trials)
    seconds = time.monotonic() - started
    print(
        f"{identical} of {args.trials} trials identical to the reference bit for bit (metrics "
        f"and final train state), {seconds:.0f}s"
    )
    if args.json:
        report = {
            "reference": dataclasses.asdict(timeline),
            "trials": [trial.to_json() for trial in trials],
            "identical": identical,
            "seconds": round(seconds, 1),
            "workdir_root": str(root),
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    if identical < args.trials:
        print(f"runs kept in {root}")
        return 1
    if args.workdir_root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(terminal.run(main))
