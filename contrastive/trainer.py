"""One trainer for every method: CLIP, SigLIP, LiT, DET / HET / HET-XL contrastive, classification.

Read top to bottom: config -> mesh -> input -> model and objective -> optimizer -> state
(fresh or restored) -> step -> evaluators -> loop (log, evaluate, checkpoint, preemption).
The method is chosen by the config alone (contrastive/config_schema.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils

from contrastive import storage
from contrastive.accumulation import check_microbatching
from contrastive.checkpoint import Checkpointer
from contrastive.config_schema import checkpoint_config
from contrastive.evaluators.build import build_evaluators
from contrastive.experiment import Task, build_experiment, build_task, resolve_total_steps
from contrastive.freezing import report_frozen
from contrastive.mesh import BATCH_AXES, make_mesh
from contrastive.metric_logging import (
    MetricLogger,
    Progress,
    format_metrics,
    log_primary,
)
from contrastive.preemption import PreemptionGuard
from contrastive.report import plot_curves
from contrastive.step import (
    abstract_params,
)
from contrastive.validation import validate_config
from data.config import validate_input_config
from data.config_blocks import ConfigError
from data.pipeline import make_global_iterator

__all__ = [
    "Task",
    "TrainResult",
    "TrainedRun",
    "build_task",
    "load_trained",
    "resolve_total_steps",
    "train",
    "validate_config",
]


@dataclasses.dataclass
class TrainResult:
    """evaluations: each evaluator's full report (its evaluate()) from an evaluation at the last
    step, so a caller that wants the final report does not evaluate the same parameters again;
    empty when the run resumed with nothing left to train or stopped early."""

    step: int
    preempted: bool
    metrics: dict
    evaluations: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Run files and resuming


def checkpoint_directory(values: Mapping[str, Any], workdir: str) -> str:
    """checkpoint.directory, or WORKDIR/checkpoints."""
    return checkpoint_config(values).directory or storage.join(workdir, "checkpoints")


# What a resumed run must share with the run that wrote the checkpoint: anything else would
# restore parameters or optimizer state into a different structure or meaning.
RESUME_KEYS = ("task", "model", "loss", "optim")


def check_resume_compatible(saved: Mapping[str, Any], values: Mapping[str, Any], workdir) -> None:
    """Raises ConfigError listing the keys of RESUME_KEYS whose values differ."""
    normalise = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    before = flatten_dict({k: normalise(saved.get(k)) for k in RESUME_KEYS}, sep=".")
    after = flatten_dict({k: normalise(values.get(k)) for k in RESUME_KEYS}, sep=".")
    differing = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if differing:
        changes = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differing[:12])
        blocks = ", ".join(sorted({k.split(".")[0] for k in differing}))
        raise ConfigError(
            f"{workdir} holds a run with a different {blocks} "
            f"({changes}{' ...' if len(differing) > 12 else ''}); nothing was changed. "
            "Train it in a new --workdir, or resume this one with its own config; to start a "
            f"new run from this one's parameters, give the new run --config.init_from={workdir}"
        )


# ----------------------------------------------------------------------------------------------
# The loop


class PreemptionWatch:
    """Whether to save and stop now, asked once per step without waiting on any device.

    One process: a SIGTERM or Ctrl-C handler sets a flag. Several processes: JAX's preemption
    service (started by jax.distributed.initialize) hears SIGTERM on any host and agrees on one
    step at which every process sees True, so the collective save happens at the same step
    everywhere; no Python handler is installed then, since it would replace the service's.
    """

    def __init__(self):
        self.distributed = jax.process_count() > 1 and _preemption_service_running()
        self.guard = None if self.distributed else PreemptionGuard(catch_sigint=True)

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()
        return self

    def __exit__(self, *exc_info):
        if self.guard is not None:
            self.guard.__exit__(*exc_info)

    def requested(self, step: int, sync_point: bool) -> bool:
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.guard.requested
        # Several processes without the service: agree at sync points only (an all-gather).
        if not sync_point:
            return False
        flags = multihost_utils.process_allgather(np.asarray([self.guard.requested], np.int32))
        return bool(np.any(flags))


def _preemption_service_running() -> bool:
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


def train(config, workdir: str) -> TrainResult:
    """Trains (or resumes from the latest checkpoint in workdir) until the configured length or
    a SIGTERM / Ctrl-C; returns the last step, whether it was preempted and the last logged
    metrics. workdir may be a bucket URL (gs://...)."""
    # --- Everything checked before anything is read or written (contrastive/validation.py)
    values = validate_config(config)
    workdir = storage.absolute(str(workdir))
    train_input = validate_input_config(values["input"])
    num_steps = resolve_total_steps(values, train_input)

    # --- Mesh and input
    mesh = make_mesh(values.get("mesh"))
    accum_steps = values["accum_steps"]
    check_microbatching(train_input.batch_size, accum_steps, mesh.size)
    # Images cross to the devices as uint8 (a quarter of the bytes of float32) and are scaled
    # inside the step; the next batches are already on their way to the devices.
    # Opened before anything is written: training data that is not there leaves no trace.
    try:
        train_iter = make_global_iterator(
            train_input, mesh, BATCH_AXES, uint8_images=True, device_prefetch=2
        )
    except FileNotFoundError as error:
        raise ConfigError(f"input.source: {error}") from None

    # --- A resumed run must be the same run (checked before anything is written)
    config_path = storage.join(workdir, "config.json")
    checkpoint = checkpoint_config(values)
    checkpointer = Checkpointer(
        checkpoint_directory(values, workdir),
        keep=checkpoint.keep,
        async_save=checkpoint.async_save,
    )
    latest = checkpointer.latest_step()
    if latest is not None and storage.exists(config_path):
        check_resume_compatible(json.loads(storage.read_text(config_path)), values, workdir)

    # --- Model, objective, optimizer, step (contrastive/experiment.py, shared with evaluation
    # and the benchmark)
    experiment = build_experiment(values, mesh)
    task, schedule = experiment.task, experiment.schedule
    freeze_rules = values["optim"].get("freeze") or []
    if freeze_rules:
        log_primary(report_frozen(experiment.abstract_params(), freeze_rules).summary())

    # --- State: restored from the latest checkpoint, or fresh
    restored = None
    if latest is not None:
        abstract, shardings = experiment.abstract_state()
        # A damaged newest checkpoint is reported, set aside and an older one taken.
        restored = checkpointer.restore_latest_intact(abstract, report=log_primary)
    if restored is not None:
        step, state, input_state, _ = restored
        if input_state is not None:
            train_iter.set_state(input_state)
        log_primary(f"resumed from step {step} in {workdir}")
    else:
        load_params = task.load_params
        if values.get("init_from"):
            load_params = warm_start(values["init_from"], load_params)
        state, shardings = experiment.init_state(load_params)
    # Evaluation inputs are opened now (each reads until one record survives), not after training.
    evaluators = build_evaluators(values, task.model, mesh)
    # Written only now: a config that failed validation, restore or an evaluation input leaves
    # the workdir as it was.
    if jax.process_index() == 0:
        storage.write_text(config_path, json.dumps(values, indent=2, default=str))
    step_fn = experiment.train_step(shardings, prepare_batch=train_iter.device_preprocess)

    # --- Loop. Steps are dispatched without waiting on device values; the host reads the
    # device (metrics, non-finite counter, agreement on preemption) only at sync points: log,
    # evaluation and checkpoint steps.
    first_step = int(state.step)
    log_every = values["log_every"]
    checkpoint_every = checkpoint.every_steps
    max_nonfinite = values["max_nonfinite_in_a_row"]
    logger = MetricLogger(workdir, resume_step=first_step)
    progress = Progress(num_steps, first_step, train_input.batch_size, mesh.size)
    last_metrics: dict = {}
    final_evaluations: dict = {}
    preempted = False
    # Skipped updates counted up to the last log line; each line reports those since.
    nonfinite_logged = int(state.nonfinite_updates)

    def save(step):
        checkpointer.save(
            step,
            state,
            input_state=train_iter.get_state(),
            metadata={"step": step, "total_steps": num_steps, "config": values},
        )

    if first_step < num_steps:
        log_primary(f"step {first_step + 1}: compiling the train step, reading the first batches")
    with PreemptionWatch() as preemption:
        for step in range(first_step + 1, num_steps + 1):
            state, metrics = step_fn(state, next(train_iter))
            is_last = step == num_steps
            due_log = step % log_every == 0 or is_last
            due_checkpoint = step % checkpoint_every == 0 or is_last
            due_evals = {
                n: e for n, (every, e) in evaluators.items() if step % every == 0 or is_last
            }
            sync_point = due_log or due_checkpoint or bool(due_evals)
            if sync_point:  # one read of both counters
                in_a_row, nonfinite_total = map(
                    int, jax.device_get((state.nonfinite_in_a_row, state.nonfinite_updates))
                )
            if due_log or due_evals:
                metrics = jax.device_get(metrics)
                metrics["nonfinite"] = nonfinite_total - nonfinite_logged
                nonfinite_logged = nonfinite_total
                metrics["learning_rate"] = float(schedule(step - 1))
                metrics["examples_per_sec"] = progress.rate(step)
                metrics.update({f"skipped_{k}": v for k, v in train_iter.skipped().items()})
                log_primary(
                    progress.line(step, float(metrics["loss"]), metrics["examples_per_sec"])
                )
                for name, evaluator in due_evals.items():
                    report = evaluator.evaluate(state.params)
                    results = evaluator.log_scalars(report)
                    log_primary(f"step {step} | {name}: {format_metrics(results)}")
                    metrics.update(results)
                    if is_last:
                        final_evaluations[name] = report
                last_metrics = logger.write(step, metrics)
                if due_evals and jax.process_index() == 0:
                    plot_curves(logger.rows, storage.join(workdir, "curves.png"))
            if sync_point and in_a_row >= max_nonfinite:
                checkpointer.wait_until_finished()
                raise FloatingPointError(
                    f"{in_a_row} non-finite updates in a row at step {step}; "
                    "the last checkpoint holds finite parameters. Likely causes: a learning rate "
                    "too high for the batch (optim.lr, a longer warmup), a temperature allowed "
                    "too low (model.temperature), no gradient clipping (optim.clip_norm), or "
                    "token ids past the text tower's vocabulary"
                )
            if preemption.requested(step, sync_point):
                save(step)
                preempted = True
                log_primary(f"termination requested: saved step {step} and stopped")
                break
            if due_checkpoint:
                save(step)
            if due_evals or due_checkpoint:
                # Evaluations, the plot and checkpoint saves are not training time.
                progress.restart_clock(step)
    checkpointer.wait_until_finished()
    checkpointer.close()
    logger.close()
    return TrainResult(int(state.step), preempted, last_metrics, final_evaluations)


# ----------------------------------------------------------------------------------------------
# Reloading a run


@dataclasses.dataclass
class TrainedRun:
    """A finished (or running) run's config, model and parameters at one step.

    state: the whole TrainState (optimizer included), only when asked for with_optimizer.
    """

    values: dict
    task: Task
    mesh: Any
    params: Any
    step: int
    state: Any = None


def load_trained(workdir: str, step: int | None = None, with_optimizer: bool = False) -> TrainedRun:
    """The config a run saved in workdir and its parameters at `step` (default: the latest).

    Only the parameters are read (no optimizer state, no training input), unless
    with_optimizer asks for the whole train state.
    """
    workdir = storage.absolute(str(workdir))
    config_path = storage.join(workdir, "config.json")
    if not storage.exists(config_path):
        raise FileNotFoundError(f"{workdir} holds no config.json: is it a training workdir?")
    values = validate_config(json.loads(storage.read_text(config_path)))
    checkpointer = Checkpointer(checkpoint_directory(values, workdir))
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no finished checkpoint")
    mesh = make_mesh(values.get("mesh"))
    state = None
    if with_optimizer:
        experiment = build_experiment(values, mesh)
        task = experiment.task
        state, _, _ = checkpointer.restore(step, experiment.abstract_state()[0])
        params = state.params
    else:  # no optimizer, no training input: the parameters alone
        task = build_task(values, mesh)
        rng = jax.random.key(values["seed"])
        params = checkpointer.restore_params(step, abstract_params(task.init_params, rng, mesh))
    checkpointer.close()
    return TrainedRun(values, task, mesh, params, step, state)


def warm_start(source_workdir: str, then: Callable[[Any], Any] | None = None) -> Callable:
    """A load_params function: every parameter whose "/"-joined name and shape match one of the
    latest parameters of the run in source_workdir takes that value; the rest keep their init.
    `then` (e.g. a LiT tower loader) runs first, so the source run has the last word."""

    def load(params):
        if then is not None:
            params = then(params)
        source = load_trained(source_workdir)
        source_params = flatten_dict(
            multihost_utils.process_allgather(source.params, tiled=True), sep="/"
        )
        flat = flatten_dict(params, sep="/")
        taken = {
            name: np.asarray(source_params[name], value.dtype)
            for name, value in flat.items()
            if name in source_params and np.shape(source_params[name]) == np.shape(value)
        }
        log_primary(
            f"init_from {source_workdir} (step {source.step}): {len(taken)} of {len(flat)} "
            "parameter arrays taken, the rest keep their initial values"
        )
        return unflatten_dict({**flat, **taken}, sep="/")

    return load
