"""A trainer config checked in full before anything is written, read or compiled.

`validate_config(config)` returns the config as a plain dict with what can be derived filled in, or
raises one ConfigError listing every problem, one line each, "key: rule". In order:

1. structure: top-level keys, types, ranges (contrastive/config_schema.py), and the one
   Monte-Carlo sampling block (sampling keys left in model.noise or loss are named as moved);
2. the training and evaluation input blocks (data/config.py): sources, op strings, tokenizers;
3. shapes derived from the training op string: model.image_size from its last resize or crop,
   model.text_length from tokenize(max_len), the text tower's vocab_size from the tokenizer.
   Given values must agree (a vocabulary smaller than the tokenizer's ids would train on NaN);
4. the model built abstractly (jax.eval_shape of its init: no parameters are allocated), which
   surfaces tower-name typos and unknown tower options;
5. the loss against the model (HET-XL needs model noise, SigLIP a bias), then one objective call
   traced abstractly on a batch of the configured shape;
6. the run length and the optimizer against it and against the parameter names;
7. files the config names (pretrained npz, the run init_from starts from).

Nothing here compiles or reads a batch, so a broken config fails in seconds.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from contrastive import config_schema, storage
from contrastive.config_schema import as_dict
from contrastive.experiment import (
    build_model,
    build_task,
    loss_from_config,
    resolve_total_steps,
)
from contrastive.mesh import make_mesh
from contrastive.optim import make_optimizer
from contrastive.optim_config import validate_optim_config
from data.config import InputConfig, validate_input_config
from data.config_blocks import ConfigError, build_block
from data.preprocess import PP_OPS, parse_op, split_ops
from data.tokenizers import make_tokenizer
from models.heteroscedastic.sampling import Sampling, pop_moved_keys

# Ops that leave images at a fixed (height, width), and the argument that sets it.
SIZING_OPS = ("resize", "central_crop", "random_crop", "inception_crop")
# Text towers whose vocabulary is fixed by their pretrained weights.
FIXED_VOCABULARIES = {"bert_minilm": 30522}


def validate_config(config) -> dict:
    """The config as a plain dict with derived shapes filled in; ConfigError lists every problem."""
    values = copy.deepcopy(as_dict(config))
    problems = Problems()
    problems.extend(config_schema.validate_structure(values))
    config_schema.fill_defaults(values)
    _check_sampling(values, problems)
    inputs = _check_inputs(values, problems)
    task = values.get("task")
    model_block = values.get("model")
    if task in config_schema.TASKS and isinstance(model_block, Mapping):
        values["model"] = dict(model_block)
        if "input" in inputs:
            _derive_shapes(values, inputs["input"], task, problems)
        _check_eval_shapes(values, inputs, problems)
        if task == "contrastive":
            _check_loss_against_model(values, problems)
        param_shapes = _check_model_and_objective(values, inputs.get("input"), problems)
        _check_optimizer(values, inputs.get("input"), param_shapes, problems)
    _check_files(values, problems)
    problems.raise_if_any()
    return values


def _check_sampling(values: dict, problems: Problems) -> None:
    """The sampling block, and sampling keys still in model.noise or loss (named, then dropped
    so that the blocks they sit in are not reported again for them)."""
    problems.extend(pop_moved_keys(values))
    if not isinstance(values.get("sampling"), Mapping):  # absent: the defaults; else reported
        return
    _, found = build_block(Sampling, values["sampling"], "sampling")
    if found:
        problems.extend(found)
        # Reported once: the loss and model checks go on with the default sampling.
        values["sampling"] = {}


class Problems(list):
    """Problem lines: a ConfigError's own lines, any other exception's message line by line."""

    def add(self, where: str, error: BaseException | str) -> None:
        if isinstance(error, ConfigError):
            lines = error.problems
        else:
            text = str(error).strip() or type(error).__name__
            lines = [line.strip() for line in text.splitlines() if line.strip()]
        for line in lines:
            self.append(line if not where or line.startswith(where) else f"{where}: {line}")

    def raise_if_any(self) -> None:
        if self:
            raise ConfigError(list(self))


# ----------------------------------------------------------------------------------------------
# Inputs


def _check_inputs(values: dict, problems: Problems) -> dict[str, InputConfig]:
    blocks = {}
    if isinstance(values.get("input"), Mapping):
        blocks["input"] = values["input"]
    for name, block in (values.get("evals") or {}).items():
        if isinstance(block, Mapping) and isinstance(block.get("input"), Mapping):
            blocks[f"evals.{name}.input"] = block["input"]
    checked = {}
    for where, block in blocks.items():
        try:
            checked[where] = validate_input_config(block, where)
        except ValueError as error:
            problems.add(where, error)
    train = checked.get("input")
    if train is not None and train.num_epochs is not None:
        problems.append("input.num_epochs must be None for training (the length is total_*)")
    return checked


def _bound_op_arguments(pp: str) -> list[tuple[str, dict[str, Any]]]:
    """(op name, every argument by name, defaults included) for each op of a valid op string."""
    bound = []
    # Parsed only (parse_pp would build every op again, tokenizers included): the string was
    # validated with its input block already.
    for name, args, kwargs in (parse_op(text) for text in split_ops(pp) if text):
        signature = inspect.signature(PP_OPS.get(name))
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        bound.append((name, dict(arguments.arguments)))
    return bound


def pp_image_size(pp: str) -> tuple[int, int] | None:
    """(height, width) of the "image" an op string ends with, when an op fixes it."""
    size = None
    for name, arguments in _bound_op_arguments(pp):
        if arguments.get("key", "image") != "image":
            continue
        if name in SIZING_OPS:
            value = arguments["size"]
            size = (value, value) if isinstance(value, int) else tuple(value)
        elif name == "resize_small":
            size = None
    return size


def pp_tokenizer(pp: str) -> tuple[int, str] | None:
    """(max_len, tokenizer spec) of the op that tokenizes the caption into "text"."""
    for name, arguments in _bound_op_arguments(pp):
        if name == "tokenize" and (arguments.get("out_key") or arguments["key"]) == "text":
            return arguments["max_len"], arguments["model"]
    return None


# ----------------------------------------------------------------------------------------------
# Shapes derived from the input


def _derive_shapes(values: dict, train: InputConfig, task: str, problems: Problems) -> None:
    model = values["model"]
    size = pp_image_size(train.pp)
    if size is not None and size[0] != size[1]:
        problems.append(f"input.pp: yields {size[0]}x{size[1]} images; the towers take squares")
    elif size is not None:
        _derive(model, "image_size", size[0], "input.pp resizes/crops to", problems)
    elif model.get("image_size") is None:
        problems.append(
            "model.image_size: not set, and input.pp has no resize or crop to a fixed size "
            "to derive it from"
        )
    if task != "contrastive":
        return
    tokenizing = pp_tokenizer(train.pp)
    if tokenizing is None:
        if model.get("text_length") is None:
            problems.append("model.text_length: not set, and input.pp has no tokenize op")
        return
    max_len, spec = tokenizing
    _derive(model, "text_length", max_len, "input.pp tokenizes to max_len", problems)
    tower = model.get("text_tower")
    if not isinstance(tower, Mapping):
        return
    try:
        tokenizer_vocab = tokenizer_vocab_size(spec)
    except (ValueError, OSError):  # already reported with the op string
        return
    name = tower.get("name")
    if name not in FIXED_VOCABULARIES and tower.get("vocab_size") is None:
        model["text_tower"] = {**tower, "vocab_size": tokenizer_vocab}
    vocab = _text_vocab_size(model)
    if vocab is None or vocab >= tokenizer_vocab:
        return
    if name in FIXED_VOCABULARIES:
        problems.append(
            f"input.pp: tokenizer {spec!r} has {tokenizer_vocab} ids, the {name} text tower "
            f"embeds {vocab}; use its own vocabulary (model='minilm')"
        )
    else:
        problems.append(
            f"model.text_tower.vocab_size={vocab} is smaller than the {spec!r} tokenizer's "
            f"{tokenizer_vocab} ids (input.pp): larger ids would embed as NaN. Set it to "
            f"{tokenizer_vocab}, or leave it out to derive it"
        )


def _check_eval_shapes(values: dict, inputs: dict[str, InputConfig], problems: Problems) -> None:
    """Evaluation op strings against the model's input size, evaluation tokenizers against its
    vocabulary (the evaluators check again against the data when they are built)."""
    model = values["model"]
    image_size = model.get("image_size")
    vocab = _text_vocab_size(model)
    for where, block in inputs.items():
        if where == "input":
            continue
        size = pp_image_size(block.pp)
        if size is not None and image_size is not None and size != (image_size, image_size):
            problems.append(
                f"{where}.pp: yields {size[0]}x{size[1]} images, the model takes "
                f"{image_size}x{image_size} (model.image_size)"
            )
        spec = (values["evals"][where.split(".")[1]] or {}).get("tokenizer")
        tokenizing = pp_tokenizer(block.pp)
        spec = spec or (tokenizing and tokenizing[1])
        if spec and vocab is not None:
            try:
                ids = tokenizer_vocab_size(spec)
            except (ValueError, OSError) as error:
                problems.add(where.rsplit(".", 1)[0] + ".tokenizer", error)
                continue
            if ids > vocab:
                problems.append(
                    f"{where.rsplit('.', 1)[0]}: tokenizer {spec!r} has {ids} ids, more than "
                    f"the text tower's vocabulary of {vocab}"
                )


def _text_vocab_size(model: dict) -> int | None:
    tower = model.get("text_tower")
    if not isinstance(tower, Mapping):
        return None
    if tower.get("name") in FIXED_VOCABULARIES:
        return FIXED_VOCABULARIES[tower["name"]]
    vocab = tower.get("vocab_size")
    return vocab if isinstance(vocab, int) else None


@functools.lru_cache(maxsize=16)
def tokenizer_vocab_size(spec: str) -> int:
    """How many ids the tokenizer `spec` (data/tokenizers.py) can produce."""
    return make_tokenizer(spec).vocab_size


def _derive(model: dict, key: str, derived: int, source: str, problems: Problems) -> None:
    given = model.get(key)
    if given is None:
        model[key] = derived
    elif given != derived:
        problems.append(
            f"model.{key}={given} but {source} {derived}: leave model.{key} out to derive it, "
            "or change one of them"
        )


# ----------------------------------------------------------------------------------------------
# Model, loss and one objective call, all abstract


def _check_loss_against_model(values: dict, problems: Problems) -> None:
    loss, model = values.get("loss"), values["model"]
    if not isinstance(loss, Mapping):
        return
    name = loss.get("name")
    noise = model.get("noise")
    if name == "hetxl" and noise is None:
        problems.append(
            "loss.name='hetxl' needs model.noise (the HET-XL noise on the image embedding), "
            "which is None"
        )
    if name in ("clip", "siglip") and noise is not None:
        problems.append(
            f"model.noise is set but loss.name={name!r} never samples it (its parameters would "
            "not train): set model.noise=None for a deterministic baseline"
        )
    if name == "siglip" and model.get("bias_init") is None:
        problems.append("loss.name='siglip' needs model.bias_init (e.g. -10.0), which is None")


def _check_model_and_objective(values: dict, train: InputConfig | None, problems: Problems):
    """The parameter shapes of the model (None when it cannot be built). The model is checked
    even when the loss is broken; the objective only when both are sound."""
    task = values["task"]
    shape_keys = ("image_size", "text_length") if task == "contrastive" else ("image_size",)
    if any(values["model"].get(key) is None for key in shape_keys):
        return None  # already reported by _derive_shapes
    sound = True
    if task == "contrastive":
        try:
            loss_from_config(values)
        except (ValueError, TypeError) as error:
            problems.add("loss", error)
            sound = False
    # A seed of the wrong type is reported by the structure check; the shapes do not depend on it.
    rng = jax.random.key(values["seed"] if isinstance(values["seed"], int) else 0)
    try:
        _, init_params = build_model(values)
        param_shapes = jax.eval_shape(init_params, rng)
    except Exception as error:  # noqa: BLE001 - the towers' own checks raise many types
        problems.add("model", _first_line(error))
        return None
    try:
        mesh = make_mesh(values.get("mesh"))
    except (ValueError, TypeError) as error:
        if not any(line.startswith("mesh") for line in problems):  # else reported already
            problems.add("mesh", error)
        sound = False
    if not sound or train is None:
        return param_shapes
    accum_steps = values["accum_steps"]
    if not isinstance(accum_steps, int) or accum_steps < 1:
        return param_shapes  # reported by the structure check
    microbatch = train.batch_size // accum_steps
    if train.batch_size % accum_steps or microbatch % mesh.size:
        problems.append(
            f"input.batch_size={train.batch_size}: each of the {accum_steps} microbatch(es) "
            f"must split evenly over the {mesh.size} devices"
        )
        return param_shapes
    try:
        objective = build_task(values, mesh).objective
        jax.eval_shape(objective, param_shapes, _batch_shapes(values, microbatch), rng)
    except Exception as error:  # noqa: BLE001
        problems.add("loss" if task == "contrastive" else "model", _first_line(error))
    return param_shapes


def _batch_shapes(values: dict, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = values["model"]["image_size"]
    shapes = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)}
    if values["task"] == "contrastive":
        shapes["text"] = jax.ShapeDtypeStruct((batch, values["model"]["text_length"]), jnp.int32)
    else:
        shapes["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return shapes


# Long enough that no warmup or cooldown exceeds it: stands in for a run length not yet known.
RUN_LENGTH_UNKNOWN = 2**62


def _check_optimizer(
    values: dict, train: InputConfig | None, param_shapes, problems: Problems
) -> None:
    """The optimizer block against the run length, and its regexes against the parameter names
    when the model could be built."""
    optim = values.get("optim")
    if not isinstance(optim, Mapping) or not isinstance(values.get("input"), Mapping):
        return
    if not any(values.get(key) is not None for key in config_schema.DURATIONS):
        return
    if train is None and values.get("total_epochs") is not None:
        # An epoch length needs a valid input block, whose problems are reported already. The
        # optimizer's own keys are still checked; the rules that need the run length (warmup
        # against total steps) wait until it can be known.
        num_steps = RUN_LENGTH_UNKNOWN
    else:
        try:
            num_steps = resolve_total_steps(values, train)
        except OSError as error:
            # Counting an epoch reads the training source: files that are not there are the
            # source's problem, not the run length's.
            problems.add("input.source", error)
            return
        except ValueError as error:
            problems.add("total_epochs", error)
            return
    try:
        if num_steps == RUN_LENGTH_UNKNOWN or param_shapes is None:
            validate_optim_config(dict(optim), num_steps)
        else:
            make_optimizer(dict(optim), num_steps, param_shapes)
    except (ValueError, TypeError) as error:
        problems.add("optim", error)


def _first_line(error: BaseException) -> str:
    """The error's first line; the type is named only when it is not an ordinary value error."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(error, (ValueError, KeyError, TypeError)):
        return first
    return f"{type(error).__name__}: {first}"


# ----------------------------------------------------------------------------------------------
# Files


def _check_files(values: dict, problems: Problems) -> None:
    init_from = values.get("init_from")
    if isinstance(init_from, str) and not storage.exists(storage.join(init_from, "config.json")):
        problems.append(f"init_from: {init_from} holds no config.json (it names a run's workdir)")
    image_init = (values.get("model_init") or {}).get("image")
    if isinstance(image_init, Mapping):
        path = image_init.get("npz")
        if not isinstance(path, str):
            problems.append("model_init.image.npz: the path of a ViT .npz checkpoint is missing")
        elif not storage.exists(path):
            problems.append(f"model_init.image.npz: no file at {path}")
