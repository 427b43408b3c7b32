"""Kill training at random moments and check that resuming reproduces an uninterrupted run exactly.

    python -m scripts.chaos --config configs/demo.py[:arg] --trials N [--seed S]
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

    python -m scripts.chaos --trials 3 --config configs/demo.py:batch=16 \\
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
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np

from scripts import terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_WRITE, EVALUATION, RANDOM_TIME = "checkpoint write", "evaluation", "random time"
PHASES = (CHECKPOINT_WRITE, EVALUATION, RANDOM_TIME)
# How far into a phase (as a fraction of the reference's time for it) a kill may land: short
# of the end, so that a slightly faster run is still inside the phase.
LATEST_FRACTION = 0.8
POLL_SECONDS = 0.005
HUNG_AFTER_SECONDS = 600  # the least time a run gets before it counts as hung
# Metrics that measure wall-clock time, not the computation.
WALL_CLOCK_METRICS = frozenset({"examples_per_sec"})

# Lines the trainer prints (contrastive/trainer.py, scripts/train.py).
PROGRESS_LINE = re.compile(r"^step (\d+)/\d+ \|")
EVALUATION_LINE = re.compile(r"^step (\d+) \| \w+: ")
RESUMED_LINE = re.compile(r"^resumed from step (\d+)")
# Orbax's names under the checkpoint directory: a finalized step, a step being written.
FINAL_STEP = re.compile(r"^(\d+)$")
TEMPORARY_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


# ----------------------------------------------------------------------------------------------
# Watching one training process


@dataclasses.dataclass
class Event:
    seconds: float  # since the process started
    kind: str  # "logged", "evaluated", "resumed", "writing", "written"
    step: int


@dataclasses.dataclass
class KillPlan:
    """SIGKILL `delay` seconds after the trigger: the start of the checkpoint write or the
    evaluation at `step`, or for a random time the progress line of `step` (None: the start)."""

    phase: str
    step: int | None
    delay: float

    def trigger(self, events: list[Event]) -> float | None:
        """Seconds since the start at which the trigger happened, or None while it has not."""
        if self.step is None:
            return 0.0
        # A checkpoint written between two polls is never seen as temporary: its end counts.
        kinds = ("writing", "written") if self.phase == CHECKPOINT_WRITE else ("logged",)
        times = [e.seconds for e in events if e.kind in kinds and e.step == self.step]
        return min(times) if times else None

    def describe(self) -> str:
        if self.phase != RANDOM_TIME:
            return f"{self.phase} of step {self.step} +{self.delay:.2f}s"
        after = "the start" if self.step is None else f"step {self.step}"
        return f"{self.phase}: {after} +{self.delay:.2f}s"


@dataclasses.dataclass
class RunOutcome:
    exit_code: int
    seconds: float
    events: list[Event]
    output: list[str]
    killed_at: float | None = None  # seconds since the start
    landed: str = ""  # where the kill landed, checked when it was sent
    last_logged_step: int | None = None  # at the kill, or at the end
    timed_out: bool = False

    def steps(self, kind: str) -> dict[int, float]:
        """{step: seconds} of the first event of `kind` for each step."""
        found: dict[int, float] = {}
        for event in self.events:
            if event.kind == kind:
                found.setdefault(event.step, event.seconds)
        return found

    def resumed_from(self) -> int | None:
        return next((e.step for e in self.events if e.kind == "resumed"), None)


def _read_lines(stream: IO[str], lines: queue.Queue, start: float) -> None:
    for line in stream:
        lines.put((time.monotonic() - start, line.rstrip("\n")))


def _line_event(seconds: float, line: str) -> Event | None:
    for kind, pattern in (
        ("logged", PROGRESS_LINE),
        ("evaluated", EVALUATION_LINE),
        ("resumed", RESUMED_LINE),
    ):
        match = pattern.match(line)
        if match:
            return Event(seconds, kind, int(match.group(1)))
    return None


def _checkpoint_names(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(directory)]
    except FileNotFoundError:
        return []


def checkpoint_steps(directory: Path, pattern: re.Pattern = FINAL_STEP) -> set[int]:
    return {int(m.group(1)) for name in _checkpoint_names(directory) if (m := pattern.match(name))}


def run_training(
    command: list[str],
    workdir: Path,
    plan: KillPlan | None,
    env: dict[str, str],
    timeout: float | None = None,
) -> RunOutcome:
    """Runs `command` (a scripts.train command on workdir) to its end, or kills it as `plan`
    says, or when it runs past `timeout` seconds; events are read from its output lines and its
    checkpoint directory as they appear."""
    checkpoints = workdir / "checkpoints"
    # Left by a killed run (a temporary directory among them): not this run's events.
    present = set(_checkpoint_names(checkpoints))
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches any helper it starts
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines, start), daemon=True)
    reader.start()
    outcome = RunOutcome(exit_code=0, seconds=0.0, events=[], output=[])

    def watch() -> None:
        nonlocal present
        while not lines.empty():
            seconds, line = lines.get()
            outcome.output.append(line)
            event = _line_event(seconds, line)
            if event is not None:
                outcome.events.append(event)
                if event.kind == "logged":
                    outcome.last_logged_step = event.step
        now = time.monotonic() - start
        names = set(_checkpoint_names(checkpoints))
        for name in sorted(names - present):
            for kind, pattern in (("writing", TEMPORARY_STEP), ("written", FINAL_STEP)):
                if match := pattern.match(name):
                    outcome.events.append(Event(now, kind, int(match.group(1))))
        present = names

    while process.poll() is None or reader.is_alive():
        watch()
        now = time.monotonic() - start
        if process.poll() is None and outcome.killed_at is None:
            trigger = None if plan is None else plan.trigger(outcome.events)
            if trigger is not None and now >= trigger + plan.delay:
                outcome.landed = _where_it_lands(plan, outcome, checkpoints)
                os.killpg(process.pid, signal.SIGKILL)
                outcome.killed_at = now
            elif timeout is not None and now > timeout and not outcome.timed_out:
                os.killpg(process.pid, signal.SIGKILL)
                outcome.timed_out = True
        time.sleep(POLL_SECONDS)
    watch()
    outcome.exit_code = process.wait()
    outcome.seconds = time.monotonic() - start
    return outcome


def _where_it_lands(plan: KillPlan, outcome: RunOutcome, checkpoints: Path) -> str:
    """Whether the process is inside the phase aimed at, and which checkpoints are being
    written, as far as its output and its directory tell at this instant."""
    writing = sorted(checkpoint_steps(checkpoints, TEMPORARY_STEP) - checkpoint_steps(checkpoints))
    if plan.phase == CHECKPOINT_WRITE:
        where = "in flight" if plan.step in writing else "after the write"
        writing = [step for step in writing if step != plan.step]
    elif plan.phase == EVALUATION:
        where = "in evaluation" if plan.step not in outcome.steps("evaluated") else "after it"
    elif outcome.last_logged_step is None:
        where = "before the first progress line"
    else:
        where = f"after the line of step {outcome.last_logged_step}"
    return where + "".join(f", checkpoint {step} in flight" for step in writing)


# ----------------------------------------------------------------------------------------------
# Kill moments


@dataclasses.dataclass
class Timeline:
    """The reference run: its duration, when each step was logged, and the seconds each
    checkpoint write and evaluation took (all in seconds, by step)."""

    seconds: float
    logged: dict[int, float]
    checkpoint_writes: dict[int, float]
    evaluations: dict[int, float]

    @classmethod
    def of(cls, run: RunOutcome) -> Timeline:
        writing, written = run.steps("writing"), run.steps("written")
        logged, evaluated = run.steps("logged"), run.steps("evaluated")
        return cls(
            seconds=run.seconds,
            logged=logged,
            checkpoint_writes={s: t - writing.get(s, t) for s, t in written.items()},
            evaluations={s: t - logged[s] for s, t in evaluated.items() if s in logged},
        )


def choose_kill(phase: str, timeline: Timeline, resume_step: int, rng: random.Random) -> KillPlan:
    """A kill in `phase` at a checkpoint or evaluation still ahead of resume_step; a random
    time when none is left."""
    windows = {CHECKPOINT_WRITE: timeline.checkpoint_writes, EVALUATION: timeline.evaluations}
    ahead = sorted(s for s in windows.get(phase, {}) if s > resume_step)
    if not ahead:
        return random_time(timeline, resume_step, rng)
    step = rng.choice(ahead)
    return KillPlan(phase, step, rng.uniform(0, LATEST_FRACTION) * windows[phase][step])


def random_time(timeline: Timeline, resume_step: int, rng: random.Random) -> KillPlan:
    """A moment of the reference as (the last progress line before it, seconds after it),
    among the lines a run resumed from resume_step prints."""
    moment = rng.uniform(0, 0.9 * timeline.seconds)
    before = [(t, s) for s, t in timeline.logged.items() if s > resume_step and t <= moment]
    if not before:
        return KillPlan(RANDOM_TIME, None, moment)
    seconds, step = max(before)
    return KillPlan(RANDOM_TIME, step, moment - seconds)


# ----------------------------------------------------------------------------------------------
# Comparing runs


@dataclasses.dataclass
class RunRecord:
    """What a finished run produced: its metrics.jsonl rows and its final train state's arrays
    by path (PRNG keys as their key data)."""

    metrics: list[dict]
    arrays: dict[str, np.ndarray]


def differences(reference: RunRecord, trial: RunRecord, limit: int = 8) -> list[str]:
    """Every way `trial` differs from `reference`, one line each (at most `limit` lines, the
    last saying how many more there were); empty when they are equal bit for bit."""
    found = _metric_differences(reference.metrics, trial.metrics)
    found += _array_differences(reference.arrays, trial.arrays)
    if len(found) > limit:
        found = found[: limit - 1] + [f"... and {len(found) - limit + 1} more"]
    return found


def _metric_differences(reference: list[dict], trial: list[dict]) -> list[str]:
    reference_steps = [row["step"] for row in reference]
    trial_steps = [row["step"] for row in trial]
    if reference_steps != trial_steps:
        return [f"metrics.jsonl logs steps {trial_steps}, the reference {reference_steps}"]
    found = []
    for want, got in zip(reference, trial, strict=True):
        for key in sorted((want.keys() | got.keys()) - WALL_CLOCK_METRICS):
            # As JSON: floats exactly (repr round-trips), NaN logged as null on both sides.
            if json.dumps(want.get(key)) != json.dumps(got.get(key)):
                found.append(
                    f"metrics step {want['step']} {key}: {got.get(key)!r}, "
                    f"the reference {want.get(key)!r}"
                )
    return found


def _array_differences(reference: dict[str, np.ndarray], trial: dict[str, np.ndarray]):
    found = []
    for name in sorted(reference.keys() | trial.keys()):
        if name not in trial or name not in reference:
            found.append(
                f"state{name}: only in the {'reference' if name in reference else 'trial'}"
            )
            continue
        want, got = reference[name], trial[name]
        if (want.dtype, want.shape) != (got.dtype, got.shape):
            found.append(
                f"state{name}: {got.dtype}{list(got.shape)}, the reference "
                f"{want.dtype}{list(want.shape)}"
            )
            continue
        bits = np.dtype(f"u{want.dtype.itemsize}")
        differing = np.flatnonzero(want.view(bits) != got.view(bits))
        if differing.size:
            first = np.unravel_index(differing[0], want.shape) if want.shape else ()
            found.append(
                f"state{name}: {differing.size} of {want.size} values differ in their bits, "
                f"first at {tuple(int(i) for i in first)}: {got[first]!r}, the reference "
                f"{want[first]!r}"
            )
    return found


def read_run(workdir: Path) -> RunRecord:
    """The metrics and the final train state (restored and verified) of a finished run."""
    import jax

    from contrastive.metric_logging import read_metrics
    from contrastive.trainer import load_trained

    state = load_trained(str(workdir), with_optimizer=True).state
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return RunRecord(read_metrics(str(workdir)), arrays)


# ----------------------------------------------------------------------------------------------
# Trials


@dataclasses.dataclass
class Trial:
    """The runs of one workdir in order (each with its kill plan, None for the last one), and
    how the finished run compares with the reference."""

    number: int
    runs: list[tuple[KillPlan | None, RunOutcome]]
    result: str = ""
    details: list[str] = dataclasses.field(default_factory=list)

    def rows(self) -> list[list[str]]:
        """One table row per kill: moment (where it landed), last step logged, resumed from."""
        rows = []
        for index, (plan, run) in enumerate(self.runs):
            if plan is None:
                continue
            after = self.runs[index + 1][1] if index + 1 < len(self.runs) else None
            if run.killed_at is None:
                moment, reached = f"{plan.describe()}: not killed, it ended first", "-"
            else:
                moment, reached = f"{plan.describe()} ({run.landed})", str(run.last_logged_step)
            resumed = "-" if after is None else str(after.resumed_from() or "fresh start")
            rows.append([str(self.number), moment, reached, resumed, self.result])
        return rows

    def to_json(self) -> dict:
        return {
            "trial": self.number,
            "runs": [
                {
                    "kill": None if plan is None else dataclasses.asdict(plan),
                    "killed_at_seconds": run.killed_at,
                    "landed": run.landed or None,
                    "last_logged_step": run.last_logged_step,
                    "resumed_from": run.resumed_from(),
                    "exit_code": run.exit_code,
                    "seconds": round(run.seconds, 2),
                }
                for plan, run in self.runs
            ],
            "result": self.result,
            "differences": self.details,
        }


@dataclasses.dataclass
class Launcher:
    """How every run is started: the scripts.train command for a workdir, and its environment."""

    config: str  # the --config value, its file path made absolute
    overrides: list[str]  # "a.b=value"
    env: dict[str, str]
    timeout: float | None = None  # seconds after which a run counts as hung and is killed

    def run(self, workdir: Path, plan: KillPlan | None) -> RunOutcome:
        command = [sys.executable, "-m", "scripts.train", "--config", self.config]
        command += ["--workdir", str(workdir)]
        command += [f"--config.{override}" for override in self.overrides]
        return run_training(command, workdir, plan, self.env, self.timeout)


def run_trial(
    number: int,
    phases: list[str],
    timeline: Timeline,
    launcher: Launcher,
    workdir: Path,
    rng: random.Random,
) -> Trial:
    """Kills a fresh run once per phase (each run resumes the previous), then runs it to its
    end."""
    trial = Trial(number, runs=[])
    for phase in phases:
        resume_step = max(checkpoint_steps(workdir / "checkpoints"), default=0)
        run = launcher.run(workdir, plan := choose_kill(phase, timeline, resume_step, rng))
        trial.runs.append((plan, run))
        if run.killed_at is None:  # it ended (or failed) before the moment came
            return trial
    trial.runs.append((None, launcher.run(workdir, None)))
    return trial


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
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument(
        "--kills_per_trial", type=int, default=1, help="SIGKILLs before a trial's last run"
    )
    parser.add_argument("--workdir_root", help="where the runs go (default: a temporary dir)")
    parser.add_argument("--json", help="also write the results to this file")
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    if args.trials < 1 or args.kills_per_trial < 1:
        parser.error("--trials and --kills_per_trial must be at least 1")
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
