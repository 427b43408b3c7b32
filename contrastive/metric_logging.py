"""Metrics to TensorBoard (clu) and to workdir/metrics.jsonl, plus human progress lines.

Only process 0 writes. metrics.jsonl has one JSON object per logged step with at least "step";
after a restart from step k, lines of steps > k (logged after the checkpoint the run resumed
from) are dropped, so the file reads as one uninterrupted run. A torn last line (a process killed
mid-write) is dropped with a warning. The workdir may be a bucket URL (contrastive/storage.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping

import jax
import numpy as np
from clu import metric_writers

from contrastive import storage

METRICS_FILE = "metrics.jsonl"
# While a resumed run rewrites metrics.jsonl (removed, then written again through one handle),
# the rows it keeps also sit in this file, written atomically first and removed once the rewrite
# is flushed: a run killed in between loses no history.
REWRITE_FILE = "metrics_rewrite.jsonl"  # not "metrics.jsonl.*": ram:// matches prefixes


def _scalar(value) -> float | int:
    value = np.asarray(jax.device_get(value))
    if value.dtype.kind in "iub":
        return int(value)
    return float(value)


def read_metrics(workdir: str) -> list[dict]:
    """All objects of workdir/metrics.jsonl, in order; an unreadable last line is dropped."""
    rows = _read_rows(storage.join(workdir, METRICS_FILE))
    rewrite = storage.join(workdir, REWRITE_FILE)
    if not storage.exists(rewrite):
        return rows
    # Interrupted (or, on an object store, still running) rewrite: the kept rows come from the
    # copy, the rows logged since from the file itself.
    kept = _read_rows(rewrite)
    last_kept = kept[-1]["step"] if kept else -1
    return kept + [row for row in rows if row["step"] > last_kept]


def _read_rows(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not JSON: {line[:80]!r}") from None
            logging.warning("%s: dropping its torn last line %r", path, line[:80])
    return rows


class MetricLogger:
    """write(step, metrics) -> TensorBoard scalars + one metrics.jsonl line (process 0 only).

    rows: what metrics.jsonl holds (process 0), kept in memory so plots need not re-read it.
    """

    def __init__(self, workdir: str, resume_step: int = 0, primary: bool | None = None):
        self.primary = jax.process_index() == 0 if primary is None else primary
        self.path = storage.join(workdir, METRICS_FILE)
        self.writer = None
        self.file = None
        self.rewrite = None
        self.rows: list[dict] = []
        if not self.primary:
            return
        kept = [row for row in read_metrics(workdir) if row["step"] <= resume_step]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        rewrite = storage.join(workdir, REWRITE_FILE)
        storage.write_text(rewrite, text)
        # One handle for the whole run: object stores cannot append to a closed object.
        self.file = storage.open_for_writing(self.path)
        self.file.write(text)
        self.rows = kept
        self.file.flush()
        # A local file holds what was flushed; an object store publishes it only when the handle
        # closes, so there the copy stays until close().
        self.rewrite = rewrite if storage.is_remote(rewrite) else None
        if self.rewrite is None:
            storage.remove(rewrite)
        # Built by hand rather than with create_default_writer, which passes the folder through
        # etils.epath (no ram:// there); TF's summary writer itself takes any gfile URL.
        self.writer = metric_writers.AsyncMultiWriter(
            [metric_writers.SummaryWriter(storage.join(workdir, "tensorboard"))]
        )

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        """Logs finite-or-not scalars as given (NaN is written as null in JSON)."""
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.primary:
            self.writer.write_scalars(int(step), {k: v for k, v in row.items() if k != "step"})
            serializable = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in row.items()
            }
            self.file.write(json.dumps(serializable) + "\n")
            self.file.flush()
            self.rows.append(serializable)
        return row

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.rewrite is not None:
            storage.remove(self.rewrite)
            self.rewrite = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Progress:
    """One log line per call: step, loss, throughput and ETA (process 0 only).

    The first interval after a (re)start includes compilation and the first input batches, so
    its rate is printed but not used for the ETA. The ETA uses the steady rate: examples over
    seconds summed over every later interval. The trainer restarts the clock after the work of a
    sync point (evaluations, the curves plot, checkpoint saves), so none of it counts as training
    time in any interval.
    """

    def __init__(
        self,
        total_steps: int,
        first_step: int,
        examples_per_step: int,
        devices: int,
        clock=time.perf_counter,
    ):
        self.total_steps, self.examples_per_step, self.devices = (
            total_steps,
            examples_per_step,
            devices,
        )
        self.clock = clock
        self.last_step, self.last_time = first_step, clock()
        self.warmed_up = False
        self.steady_examples, self.steady_seconds = 0, 0.0

    @property
    def steady_rate(self) -> float | None:
        """Examples per second over all intervals after the first; None before one ended."""
        if not self.steady_seconds:
            return None
        return self.steady_examples / self.steady_seconds

    def rate(self, step: int) -> float:
        """Examples per second since the clock last (re)started, and restarts it."""
        now = self.clock()
        examples = (step - self.last_step) * self.examples_per_step
        seconds = max(now - self.last_time, 1e-9)
        if step > self.last_step:
            if self.warmed_up:
                self.steady_examples += examples
                self.steady_seconds += seconds
            self.warmed_up = True
        self.last_step, self.last_time = step, now
        return examples / seconds

    def restart_clock(self, step: int) -> None:
        """The next interval starts now, at `step`: time spent since the last call is left out."""
        self.last_step, self.last_time = step, self.clock()

    def line(self, step: int, loss: float, examples_per_sec: float) -> str:
        steady = self.steady_rate
        if steady is None:
            eta = "after warm-up"
        else:
            eta = format_duration((self.total_steps - step) * self.examples_per_step / steady)
        return (
            f"step {step}/{self.total_steps} | loss {loss:.4f} | "
            f"{examples_per_sec:.1f} img/s ({examples_per_sec / self.devices:.1f}/device) | "
            f"ETA {eta}"
        )


def format_metrics(metrics: Mapping[str, object]) -> str:
    """ "name value, ..." with integers as integers and floats to 4 decimals."""
    parts = []
    for key, value in metrics.items():
        value = _scalar(value)
        parts.append(f"{key} {value}" if isinstance(value, int) else f"{key} {value:.4f}")
    return ", ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def log_primary(message: str) -> None:
    if jax.process_index() == 0:
        logging.info(message)
        print(message, flush=True)
