"""Evaluators from a config's `evals` block: the one place that turns eval blocks into objects.

    evals = {name: {"kind": KIND, "every_steps": int, "input": config.input block, ...}}

Kinds and their keys (contrastive/evaluators/schema.py; * = required):
  zeroshot        *input, dataset, classnames, templates, tokenizer, text_length, monte_carlo
                  Class names and templates: `classnames` / `templates` (lists; templates with
                  "{c}"), else those of `dataset` (data.zeroshot_texts: "fashion_mnist",
                  "imagenet1k" or another clip_benchmark key); templates default to CLIP's 80.
                  Prompts are tokenized as the training captions: the tokenizer of the training
                  input's tokenize op, model.text_length tokens (`tokenizer` / `text_length` may
                  be given but must agree). monte_carlo=True adds Monte-Carlo HET-XL metrics
                  (the run's sampling block: sampling.eval_samples noisy images each).
  classification  *input                      (task "classification": the classifier's head)
  retrieval       *input, max_pairs           (input yields "image" and tokenized "text")

Every evaluator (contrastive/evaluators/base.py) has `.evaluate(params)` for the full report,
`.log_scalars(report) -> {metric: number}` for training logs and `.run(params)`, the two in one.
Inputs are checked against the model when the evaluator is built: the images an eval input
yields must have the model's image_size (and its captions text_length tokens), so a mismatch
fails before training, not at the first evaluation.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from contrastive.evaluators.classification import ClassificationEvaluator
from contrastive.evaluators.retrieval import RetrievalEvaluator
from contrastive.evaluators.schema import eval_block
from contrastive.evaluators.zeroshot import MonteCarlo, ZeroShotEvaluator
from contrastive.experiment import sampling_from_config
from data.config import InputConfig, validate_input_config
from data.config_blocks import ConfigError
from data.lazy_tf import tf
from data.ops import PP_OPS
from data.pipeline import LocalBatchIterator, make_local_iterator
from data.preprocess import parse_pp
from data.tokenizers import make_tokenizer
from data.zeroshot_texts import classnames_and_templates, clip_templates, zero_shot_prompts


@dataclasses.dataclass(frozen=True)
class TextEncoding:
    """How the run's captions were tokenized: what prompts and eval captions must match."""

    tokenizer: str
    add_eos: bool
    length: int


def training_text_encoding(values: Mapping[str, Any]) -> TextEncoding:
    """The tokenizer of the training input's tokenize op, at model.text_length tokens."""
    length = values["model"].get("text_length")
    if length is None:
        raise ConfigError("model.text_length is not set: the run has no text input")
    options = _tokenize_options(values["input"]["pp"])
    if options is None:
        raise ConfigError("the training input's op string has no tokenize op writing 'text'")
    return TextEncoding(*options, length)


def _tokenize_options(pp: str) -> tuple[str, bool] | None:
    """(tokenizer spec, add_eos) of the op string's tokenize op that writes "text", or None."""
    signature = inspect.signature(PP_OPS.get("tokenize"))
    for name, args, kwargs in parse_pp(pp).ops:
        if name == "tokenize":
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            options = bound.arguments
            if (options["out_key"] or options["key"]) == "text":
                return options["model"], options["add_eos"]
    return None


def monte_carlo_options(values: Mapping[str, Any]) -> MonteCarlo:
    """MonteCarlo drawing noise as the run's sampling block says, re-normalised if the training
    loss was HET-XL with renormalize."""
    loss = dict(values.get("loss") or {})
    return MonteCarlo(
        sampling_from_config(values),
        renormalize=loss.get("name") == "hetxl" and bool(loss.get("renormalize", False)),
    )


def build_evaluators(
    values: Mapping[str, Any], model: Any, mesh: Mesh
) -> dict[str, tuple[int, Any]]:
    """{name: (every_steps, evaluator)} for every block of values["evals"].

    Args:
      values: the whole validated config as a plain dict (evals, model, input, loss are read).
      model: the run's model (TwoTowers, or ImageClassifier for classification).
      mesh: the mesh the parameters live on.
    """
    return {
        name: (block["every_steps"], build_evaluator(name, block, values, model, mesh))
        for name, block in (values.get("evals") or {}).items()
    }


def build_evaluator(
    name: str, block: Mapping[str, Any], values: Mapping[str, Any], model: Any, mesh: Mesh
) -> Any:
    """One evaluator from evals[name] (see the module docstring); ConfigError when the block
    does not fit the run."""
    checked, problems = eval_block(name, block)
    if problems:
        raise ConfigError(problems)
    kind = checked.kind
    task = values.get("task", "contrastive")
    if (kind == "classification") != (task == "classification"):
        raise ConfigError(f"evals.{name}: a {kind!r} evaluator does not apply to a {task} run")
    eval_input = validate_input_config(block["input"], f"evals.{name}.input")
    if eval_input.num_epochs is None:
        raise ConfigError(f"evals.{name}.input.num_epochs must be set (1: read the split once)")
    local_batch = _local_batch_size(name, eval_input, mesh)
    image_size = values["model"]["image_size"]

    if kind == "classification":
        batches = checked_eval_input(name, eval_input, image_size, ("label",))
        return ClassificationEvaluator(model, batches, local_batch, mesh)

    text = _checked_text_encoding(name, block, values)
    if kind == "retrieval":
        batches = checked_eval_input(name, eval_input, image_size, ("text",), text.length)
        if _tokenize_options(eval_input.pp) != (text.tokenizer, text.add_eos):
            raise ConfigError(
                f"evals.{name}.input tokenizes captions otherwise than the training input: "
                f"use tokenize(model={text.tokenizer!r}"
                + (", add_eos=True)" if text.add_eos else ")")
            )
        return RetrievalEvaluator(
            model,
            batches,
            local_batch,
            mesh,
            max_pairs=checked.max_pairs,
        )

    batches = checked_eval_input(name, eval_input, image_size, ("label",))
    classnames, templates = zeroshot_texts(block)
    prompts = zero_shot_prompts(classnames, templates)
    tokenizer = make_tokenizer(text.tokenizer, add_eos=text.add_eos)
    tokens = tokenizer.tokenize(tf.constant(prompts), text.length).numpy()
    try:
        return ZeroShotEvaluator(
            model,
            tokens,
            len(classnames),
            batches,
            local_batch,
            mesh,
            monte_carlo=monte_carlo_options(values) if checked.monte_carlo else None,
        )
    except ValueError as error:
        raise ConfigError(f"evals.{name}: {error}") from error


def zeroshot_texts(block: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(class names, templates) of a zeroshot block: its own lists, else its dataset's."""
    classnames, templates = block.get("classnames"), block.get("templates")
    if block.get("dataset") and (classnames is None or templates is None):
        dataset_names, dataset_templates = classnames_and_templates(block["dataset"])
        classnames = dataset_names if classnames is None else classnames
        templates = dataset_templates if templates is None else templates
    return list(classnames), list(templates) if templates is not None else clip_templates()


def _checked_text_encoding(name: str, block: Mapping[str, Any], values) -> TextEncoding:
    text = training_text_encoding(values)
    for key, own in (("tokenizer", text.tokenizer), ("text_length", text.length)):
        if block.get(key) is not None and block[key] != own:
            raise ConfigError(
                f"evals.{name}.{key}={block[key]!r}, but the run's texts use {own!r}: "
                "prompts must be encoded as the training captions (leave it out)"
            )
    return text


def _local_batch_size(name: str, eval_input: InputConfig, mesh: Mesh) -> int:
    batch, processes = eval_input.batch_size, jax.process_count()
    if batch % processes or batch % mesh.size:
        raise ConfigError(
            f"evals.{name}.input.batch_size={batch} must be a multiple of the {mesh.size} "
            f"devices and {processes} processes"
        )
    return batch // processes


def checked_eval_input(
    name: str,
    eval_input: InputConfig,
    image_size: int,
    needs: tuple[str, ...],
    text_length: int | None = None,
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """Builds this process's pipeline of the eval input, compares what it yields with what the
    model takes, and returns a factory of passes over it (see _passes). Building the pipeline
    traces its op string and reads records until one survives (no batch is read)."""
    local = make_local_iterator(eval_input)
    spec = local.dataset.element_spec
    where = f"evals.{name}.input"
    missing = [key for key in needs if key not in spec]
    if missing:
        raise ConfigError(f"{where} yields {sorted(spec)}, the evaluator needs {missing}")
    height, width = spec["image"].shape[1:3]
    if (height, width) != (image_size, image_size):
        raise ConfigError(
            f"{where} yields {height}x{width} images, the model takes {image_size}x{image_size} "
            "(model.image_size): resize or crop to it in the op string"
        )
    if text_length is not None and spec["text"].shape[-1] != text_length:
        raise ConfigError(
            f"{where} yields {spec['text'].shape[-1]} tokens per caption, the model was trained "
            f"on {text_length} (model.text_length)"
        )
    return _passes(local, needs)


def _passes(
    local: LocalBatchIterator, keys: tuple[str, ...]
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A factory of passes over this process's share from its start, carrying only what is
    used. Every pass rewinds the one pipeline (an evaluation never runs two passes at once)."""
    wanted = ("image", *keys)

    def batches():
        local.rewind()
        for batch in local:
            yield {key: batch[key] for key in wanted}

    return batches
