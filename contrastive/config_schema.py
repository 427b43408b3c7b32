"""The trainer's config: top-level keys, their meaning, and validation before anything compiles.

    task             "contrastive" (two towers + clip | siglip | hetxl loss) or "classification"
                     (image tower + DET / HET / HET-XL head)
    seed             int; parameters, noise draws and the input order derive from it
    input            training input, see data/config.py
    model            contrastive: models.two_towers.MODEL_KEYS; classification: CLASSIFIER_KEYS
    model_init       {"image": None | {"npz": path, "dont_load": [...]}, "text": None | "minilm"}
    init_from        a finished run's workdir: a new run starts from its latest parameters
                     wherever names and shapes match (fresh optimizer, step 0)
    loss             contrastive: {"name": "clip" | "siglip" | "hetxl", **that loss's options}
    sampling         Monte-Carlo sampling of heteroscedastic noise, read by the HET / HET-XL
                     heads, the HET-XL loss and the MC evaluators: {"train_samples": int,
                     "eval_samples": int, "chunk_size": int, "share_across_batch": bool}
                     (models/heteroscedastic/sampling.py; defaults for keys left out)
    optim            see contrastive/optim.py
    total_steps | total_epochs | total_examples     exactly one of them
    log_every        steps between metric lines
    evals            {name: {"kind": "zeroshot" | "classification" | "retrieval",
                     "every_steps": int, "input": {...}, ...}} (contrastive/evaluators/build.py)
    mesh             {"data": int, "fsdp": int}, one of them -1 (all remaining devices)
    checkpoint       {"every_steps": int, "keep": int, "async_save": bool, "directory": str}
                     (directory: default WORKDIR/checkpoints; local, gs:// or s3://)
    max_nonfinite_in_a_row   halt after this many consecutive skipped (non-finite) updates
    accum_steps      contrastive only: split each batch into this many microbatches for memory,
                     keeping every negative of the full batch (contrastive/accumulation.py)

Every problem found is reported at once, naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from contrastive.config_blocks import boolean, build_block, int_at_least, optional, setting, string
from contrastive.evaluators.schema import eval_block
from contrastive.mesh import MeshConfig
from data.config import ConfigError as ConfigError  # the one config error type

TOP_LEVEL = {
    "task": str,
    "seed": int,
    "input": Mapping,
    "model": Mapping,
    "model_init": Mapping,
    "init_from": str,
    "loss": Mapping,
    "sampling": Mapping,
    "optim": Mapping,
    "total_steps": int,
    "total_epochs": (int, float),
    "total_examples": int,
    "log_every": int,
    "evals": Mapping,
    "mesh": Mapping,
    "checkpoint": Mapping,
    "max_nonfinite_in_a_row": int,
    "accum_steps": int,
}
REQUIRED = ("task", "input", "model", "optim")
DURATIONS = ("total_steps", "total_epochs", "total_examples")
TASKS = ("contrastive", "classification")
CLASSIFIER_KEYS = (
    "image_tower",
    "num_classes",
    "head",
    "likelihood",
    "noise",
    "temperature",
    "image_size",
)
MODEL_INIT_KEYS = ("image", "text")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The config's `checkpoint` block.

    every_steps: steps between checkpoints (the last step is always saved).
    keep: how many of the newest checkpoints are kept.
    async_save: write in the background while training goes on.
    directory: where they go (local, gs:// or s3://); None: WORKDIR/checkpoints.
    """

    every_steps: int = setting(1000, int_at_least(1))
    keep: int = setting(3, int_at_least(1))
    async_save: bool = setting(True, boolean)
    directory: str | None = setting(None, optional(string))


def block_from_config(values: Mapping[str, Any], key: str, cls: type) -> Any:
    """values[key] built as the block dataclass cls (defaults where it leaves keys out);
    ConfigError lists every problem with it."""
    block, problems = build_block(cls, values.get(key), key)
    if problems:
        raise ConfigError(problems)
    return block


def checkpoint_config(values: Mapping[str, Any]) -> CheckpointConfig:
    return block_from_config(values, "checkpoint", CheckpointConfig)


def as_dict(value: Any) -> Any:
    """ConfigDict -> plain dict (recursively), anything else unchanged."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def validate_structure(config: Mapping[str, Any]) -> list[str]:
    """Problems with the top level and the trainer-owned blocks (the data, model, loss and optim
    blocks are checked by their own modules)."""
    problems = []
    unknown = sorted(set(config) - set(TOP_LEVEL))
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; known: {sorted(TOP_LEVEL)}")
    for key in REQUIRED:
        if key not in config:
            problems.append(f"missing top-level key {key!r}")
    for key, kind in TOP_LEVEL.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            problems.append(f"{key}={value!r} has the wrong type")
    if config.get("task") is not None and config.get("task") not in TASKS:
        problems.append(f"task={config.get('task')!r} is unknown; known: {list(TASKS)}")
    given = [key for key in DURATIONS if config.get(key) is not None]
    if len(given) != 1:
        problems.append(f"give exactly one of {list(DURATIONS)}, got {given or 'none'}")
    if config.get("accum_steps", 1) != 1 and config.get("task") != "contrastive":
        problems.append("accum_steps > 1 is for task='contrastive' (it keeps all negatives)")
    for key in (*DURATIONS, "log_every", "max_nonfinite_in_a_row", "accum_steps"):
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{key}={value} must be > 0")
    if config.get("task") == "classification" and isinstance(config.get("model"), Mapping):
        unknown = sorted(set(config["model"]) - set(CLASSIFIER_KEYS))
        if unknown:
            problems.append(f"unknown model key(s) {unknown}; known: {list(CLASSIFIER_KEYS)}")
    for key, cls in (("checkpoint", CheckpointConfig), ("mesh", MeshConfig)):
        if isinstance(config.get(key), Mapping):  # else: absent, or its wrong type reported
            problems += build_block(cls, config[key], key)[1]
    init = config.get("model_init") or {}
    unknown = sorted(set(init) - set(MODEL_INIT_KEYS))
    if unknown:
        problems.append(f"unknown model_init key(s) {unknown}; known: {list(MODEL_INIT_KEYS)}")
    for name, block in (config.get("evals") or {}).items():
        problems += eval_block(name, block)[1]
    return problems
