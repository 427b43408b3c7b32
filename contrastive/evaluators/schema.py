"""The blocks of a config's `evals` mapping, one frozen dataclass per evaluator kind, checked
without reading data.

Kept free of heavy imports so that config validation (contrastive/config_schema.py) can use it;
contrastive/evaluators/build.py documents what each key means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from data.config_blocks import (
    boolean,
    build_block,
    int_at_least,
    mapping,
    optional,
    setting,
    string,
    strings,
)

# Image-text pairs a retrieval evaluator reads at most (its similarity matrix is pairs^2).
MAX_PAIRS = 50_000


@dataclasses.dataclass(frozen=True)
class EvalBlock:
    """The keys every evaluator kind has (all required); the input block itself is checked by
    data.config.validate_input_config."""

    kind: str = setting(check=string)  # a key of EVAL_KINDS
    every_steps: int = setting(check=int_at_least(1))
    input: dict = setting(check=mapping)


@dataclasses.dataclass(frozen=True)
class ZeroShotEval(EvalBlock):
    dataset: str | None = setting(None, optional(string))
    classnames: list[str] | None = setting(None, optional(strings))
    templates: list[str] | None = setting(None, optional(strings))
    tokenizer: str | None = setting(None, optional(string))
    text_length: int | None = setting(None, optional(int_at_least(1)))
    monte_carlo: bool = setting(False, boolean)

    def problems(self) -> list[str]:
        if not self.dataset and not self.classnames:
            return ["dataset: needs 'dataset' or 'classnames'"]
        return []


@dataclasses.dataclass(frozen=True)
class ClassificationEval(EvalBlock):
    pass


@dataclasses.dataclass(frozen=True)
class RetrievalEval(EvalBlock):
    max_pairs: int = setting(MAX_PAIRS, int_at_least(1))


EVAL_KINDS = {
    "zeroshot": ZeroShotEval,
    "classification": ClassificationEval,
    "retrieval": RetrievalEval,
}


def eval_block(name: str, block: Any) -> tuple[EvalBlock | None, list[str]]:
    """(evals[name] as the dataclass of its kind, []) or (None, every problem with it)."""
    where = f"evals.{name}"
    if hasattr(block, "to_dict"):
        block = block.to_dict()
    if not isinstance(block, Mapping):
        return build_block(EvalBlock, block, where)
    kind = block.get("kind")
    if "kind" not in block:
        return None, [f"{where}.kind: missing (required); known: {sorted(EVAL_KINDS)}"]
    if kind not in EVAL_KINDS:
        return None, [f"{where}.kind={kind!r} is unknown; known: {sorted(EVAL_KINDS)}"]
    values = dict(block)
    problems = []
    if "mc_samples" in values:
        del values["mc_samples"]
        problems.append(
            f"{where}.mc_samples has moved: set {where}.monte_carlo=True and the "
            "number of samples in sampling.eval_samples"
        )
    instance, found = build_block(EVAL_KINDS[kind], values, where)
    problems += found
    return (None if problems else instance), problems
