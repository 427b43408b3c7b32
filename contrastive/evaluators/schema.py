"""The keys of each evaluator kind in a config's `evals` block, checked without reading data.

Kept free of heavy imports so that config validation (contrastive/config_schema.py) can use it;
contrastive/evaluators/build.py documents what each key means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

COMMON_KEYS = ("kind", "every_steps", "input")
EVAL_KEYS = {
    "zeroshot": (
        *COMMON_KEYS,
        "dataset",
        "classnames",
        "templates",
        "tokenizer",
        "text_length",
        "monte_carlo",
    ),
    "classification": COMMON_KEYS,
    "retrieval": (*COMMON_KEYS, "max_pairs"),
}


def eval_block_problems(name: str, block: Any) -> list[str]:
    """What is wrong with evals[name] without reading data (kind, keys, every_steps); [] if
    nothing. The input block itself is checked by data.config.validate_input_config."""
    kind = block.get("kind") if isinstance(block, Mapping) else None
    if kind not in EVAL_KEYS:
        return [f"evals.{name}.kind={kind!r} is unknown; known: {sorted(EVAL_KEYS)}"]
    problems = []
    if "mc_samples" in block:
        problems.append(
            f"evals.{name}.mc_samples has moved: set evals.{name}.monte_carlo=True and the "
            "number of samples in sampling.eval_samples"
        )
    unknown = sorted(set(block) - set(EVAL_KEYS[kind]) - {"mc_samples"})
    if unknown:
        problems.append(f"unknown key(s) {unknown} in evals.{name}; known: {EVAL_KEYS[kind]}")
    missing = [key for key in COMMON_KEYS if key not in block]
    if missing:
        problems.append(f"evals.{name} needs {missing}")
    every = block.get("every_steps")
    if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
        problems.append(f"evals.{name}.every_steps must be a positive int")
    if kind == "zeroshot" and not block.get("dataset") and not block.get("classnames"):
        problems.append(f"evals.{name} needs 'dataset' or 'classnames'")
    max_pairs = block.get("max_pairs", 1)
    if not isinstance(max_pairs, int) or isinstance(max_pairs, bool) or max_pairs < 1:
        problems.append(f"evals.{name}.max_pairs must be an int >= 1")
    if not isinstance(block.get("monte_carlo", False), bool):
        problems.append(f"evals.{name}.monte_carlo must be True or False")
    for key in ("classnames", "templates"):
        value = block.get(key)
        if value is not None and (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not all(isinstance(item, str) for item in value)
        ):
            problems.append(f"evals.{name}.{key} must be a list of strings")
    return problems
