"""The comparison of a finished chaos trial with the reference run, bit for bit.

Every row of metrics.jsonl (each value but wall-clock rates) and every array of the final train
state (parameters, optimizer state, PRNG key as its key data, counters) must be equal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

# Metrics that measure wall-clock time, not the computation.
WALL_CLOCK_METRICS = frozenset({"examples_per_sec"})


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
