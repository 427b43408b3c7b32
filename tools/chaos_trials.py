"""The trials of tools.chaos: run training, kill it at a chosen moment, run it again.

`run_training` runs one `scripts.train` process and records, from its output lines and its
checkpoint directory as they appear, when each step was logged, evaluated and checkpointed; it
sends SIGKILL when a `KillPlan` says. `choose_kill` places a kill in a checkpoint write, an
evaluation or at a random time, from the reference run's `Timeline`. `run_trial` kills a fresh
run once per phase (each run resumes the previous one), then runs it to its end.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT_WRITE, EVALUATION, RANDOM_TIME = "checkpoint write", "evaluation", "random time"
PHASES = (CHECKPOINT_WRITE, EVALUATION, RANDOM_TIME)
# How far into a phase (as a fraction of the reference's time for it) a kill may land: short
# of the end, so that a slightly faster run is still inside the phase.
LATEST_FRACTION = 0.8
POLL_SECONDS = 0.005

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
