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
                     "eval_samples": int, "chunk_size": int | None (auto: within
                     "chunk_bytes"), "chunk_bytes": int, "share_across_batch": bool}
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
    grad_norm_groups {name: regex}: also log grad_norm_NAME and update_norm_NAME over the
                     parameters whose "/"-joined path the regex fully matches, e.g.
                     {"noise": "image_noise_params/.*"}; a regex matching nothing is an error
    accum_steps      contrastive only: split each batch into this many microbatches for memory,
                     keeping every negative of the full batch (contrastive/accumulation.py)

`TopLevelConfig` holds these keys; every problem found is reported at once, one line each,
naming the key (`config.task='contrastiv': expected one of ['contrastive', 'classification']`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from contrastive.evaluators.schema import eval_block
from contrastive.mesh import MeshConfig
from data.config_blocks import (
    boolean,
    build_block,
    build_or_raise,
    defaults,
    int_at_least,
    integer,
    mapping,
    one_of,
    optional,
    real,
    setting,
    string,
)

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

_BLOCK = optional(mapping)
_COUNT = optional(int_at_least(1))


@dataclasses.dataclass(frozen=True)
class TopLevelConfig:
    """The config's top-level keys (see the module docstring for their meaning).

    task, input, model and optim are required; every check accepts None, which counts as the
    key left out (ml_collections configs often spell "not set" as None). The blocks are checked
    here only as mappings; their own modules check their keys. `fill_defaults` writes the
    defaults of the scalar settings into a validated config, so code reads `values["seed"]`
    and each default is defined here once.
    """

    task: str | None = setting(check=optional(one_of(TASKS)))
    input: dict | None = setting(check=_BLOCK)
    model: dict | None = setting(check=_BLOCK)
    optim: dict | None = setting(check=_BLOCK)
    seed: int = setting(0, optional(integer))
    model_init: dict | None = setting(None, _BLOCK)
    init_from: str | None = setting(None, optional(string))
    loss: dict | None = setting(None, _BLOCK)
    sampling: dict | None = setting(None, _BLOCK)
    total_steps: int | None = setting(None, _COUNT)
    total_epochs: float | None = setting(
        None, optional(real(0.0, float("inf"), low_open=True, high_open=True))
    )
    total_examples: int | None = setting(None, _COUNT)
    log_every: int = setting(50, _COUNT)
    evals: dict | None = setting(None, _BLOCK)
    mesh: dict | None = setting(None, _BLOCK)
    checkpoint: dict | None = setting(None, _BLOCK)
    max_nonfinite_in_a_row: int = setting(10, _COUNT)
    accum_steps: int = setting(1, _COUNT)
    grad_norm_groups: dict | None = setting(None, _BLOCK)

    def problems(self) -> list[str]:
        problems = []
        given = [key for key in DURATIONS if getattr(self, key) is not None]
        if len(given) != 1:
            key = given[-1] if given else DURATIONS[0]
            problems.append(f"{key}: give exactly one of {list(DURATIONS)}, got {given or 'none'}")
        if self.accum_steps not in (None, 1) and self.task != "contrastive":
            problems.append("accum_steps: > 1 is for task='contrastive' (it keeps all negatives)")
        if self.task == "classification" and self.model is not None:
            unknown = sorted(set(self.model) - set(CLASSIFIER_KEYS))
            if unknown:
                problems.append(f"model: unknown key(s) {unknown}; known: {list(CLASSIFIER_KEYS)}")
        unknown = sorted(set(self.model_init or {}) - set(MODEL_INIT_KEYS))
        if unknown:
            problems.append(f"model_init: unknown key(s) {unknown}; known: {list(MODEL_INIT_KEYS)}")
        return problems


TOP_LEVEL_KEYS = tuple(field.name for field in dataclasses.fields(TopLevelConfig))


def fill_defaults(values: dict[str, Any]) -> None:
    """Top-level settings left out (or None) of a validated config get their defaults."""
    for key, default in defaults(TopLevelConfig).items():
        if default is not None and values.get(key) is None:
            values[key] = default


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


def checkpoint_config(values: Mapping[str, Any]) -> CheckpointConfig:
    return build_or_raise(CheckpointConfig, values.get("checkpoint"), "checkpoint")


def as_dict(value: Any) -> Any:
    """ConfigDict -> plain dict (recursively), anything else unchanged."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def validate_structure(config: Mapping[str, Any]) -> list[str]:
    """Problems with the top level and the trainer-owned blocks (the data, model, loss and optim
    blocks are checked by their own modules)."""
    problems = build_block(TopLevelConfig, config, "config")[1]
    for key, cls in (("checkpoint", CheckpointConfig), ("mesh", MeshConfig)):
        if isinstance(config.get(key), Mapping):  # else: absent, or its wrong type reported
            problems += build_block(cls, config[key], key)[1]
    if isinstance(config.get("evals"), Mapping):
        for name, block in config["evals"].items():
            problems += eval_block(name, block)[1]
    return problems
