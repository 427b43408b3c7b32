"""The `config.input` block: schema, defaults and validation.

    config.input = dict(
        source=dict(name="fashion_mnist", split="train"),  # name + that source's options
        pp="decode|resize(32)|value_range(-1, 1)|tokenize(max_len=16)",
        batch_size=256,        # global, over all processes
        shuffle_buffer=10_000, # records per shuffle window (data/order.py); 0 or 1 = no shuffling
        seed=0,                # order, augmentations and captions are functions of it
        prefetch=2,            # batches prepared ahead
        num_epochs=None,       # None = repeat forever (training)
        max_text_bytes=4096,   # longer captions are skipped as text_too_long
    )

Source options (checked against the source classes in data/sources.py):
    tfds:          dataset, data_dir=None, split="train", image_key="image", text_key=None,
                   label_key=None, classnames=None, cycle_length=16
    tfrecord:      files (glob or list), image_key="image", text_key="caption", label_key=None,
                   cycle_length=16
    fashion_mnist: data_dir="/usr/share/datasets/fashion-mnist", split="train", cupl=False,
                   label_noise_confusable=0.0, label_noise_other=0.0, label_noise_seed=0
                   (input-dependent label noise, see data/fashion_mnist.py)
    image_folder:  root (one sub-folder per class), classnames=None
Paths may be remote (gs://...): every source reads through tf.io.gfile.

`validate_input_config` checks everything that can be checked without reading data (keys, types,
ranges, source options, the whole op string) and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from data.preprocess import PreprocessError, parse_pp
from data.registry import RegistryError, matches_type, type_name
from data.sources import SOURCES


class ConfigError(ValueError):
    """An invalid config: `problems` lists every problem found, one line each.

    The one error type reported as a config mistake (data, model, loss, optimizer and trainer
    checks all raise it); anything else is a bug and keeps its traceback.
    """

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if isinstance(problems, str):
            message = problems
        else:
            message = "invalid config:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """A validated config.input block (see the module docstring for the meaning of fields)."""

    source: dict[str, Any]
    pp: str
    batch_size: int
    shuffle_buffer: int = 10_000
    seed: int = 0
    prefetch: int = 2
    num_epochs: int | None = None
    max_text_bytes: int = 4096

    @property
    def source_name(self) -> str:
        return self.source["name"]

    @property
    def source_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.source.items() if k != "name"}


def _as_dict(block: Any, where: str) -> dict[str, Any]:
    if hasattr(block, "to_dict"):  # ml_collections.ConfigDict
        block = block.to_dict()
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    return dict(block)


def validate_input_config(block: Any) -> InputConfig:
    """Checks a config.input block (ConfigDict or mapping) and returns it as an InputConfig.

    Raises ConfigError naming unknown keys, missing keys, wrongly typed values, bad ranges,
    unknown sources or source options, and op-string errors.
    """
    values = _as_dict(block, "config.input")
    fields = {f.name: f for f in dataclasses.fields(InputConfig)}
    hints = typing.get_type_hints(InputConfig)
    problems = []
    unknown = sorted(set(values) - set(fields))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; known: {sorted(fields)}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in values:
            if required:
                problems.append(f"missing key {name!r}")
            continue
        if name == "source":
            continue
        if not matches_type(values[name], hints[name]):
            problems.append(f"{name}={values[name]!r} should be {type_name(hints[name])}")
    for name, low in (
        ("batch_size", 1),
        ("shuffle_buffer", 0),
        ("prefetch", 0),
        ("seed", 0),
        ("max_text_bytes", 1),
        ("num_epochs", 1),
    ):
        value = values.get(name)
        if matches_type(value, int) and value < low:
            problems.append(f"{name}={value} must be >= {low}")
    if "source" in values:
        problems += _source_problems(values["source"])
    if isinstance(values.get("pp"), str):
        try:
            parse_pp(values["pp"])
        except PreprocessError as e:
            problems.append(f"pp: {e}")
    if problems:
        raise ConfigError("config.input is invalid:\n  " + "\n  ".join(problems))
    values["source"] = _as_dict(values["source"], "config.input.source")
    return InputConfig(**values)


def _source_problems(source: Any) -> list[str]:
    try:
        options = _as_dict(source, "config.input.source")
    except ConfigError as e:
        return [str(e)]
    name = options.pop("name", None)
    if name is None:
        return [f"source needs a 'name'; known: {SOURCES.known()}"]
    if not isinstance(name, str) or name not in SOURCES:
        return [f"unknown source name {name!r}; known: {SOURCES.known()}"]
    try:
        SOURCES.check_arguments(name, (), options)
    except RegistryError as e:
        return [f"source: {e}"]
    return []
