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
                   label_noise_model="class", label_noise_confusable=0.0,
                   label_noise_other=0.0, label_noise_rate=0.0, label_noise_seed=0
                   (label noise by class or by image, see data/label_noise.py)
    image_folder:  root (one sub-folder per class), classnames=None
Paths may be remote (gs://...): every source reads through tf.io.gfile.

`validate_input_config` builds the block (data/config_blocks.py) and checks everything that can
be checked without reading data (keys, types, ranges, source options, the whole op string),
reporting every problem at once, one line each:

    input: unknown key(s) ['shuffle']; known: ['batch_size', ...]
    input.batch_size: missing (required)
    input.shuffle_buffer=-1: expected an integer >= 0
    input.pp='decode|resise(32)': op 2 ('resise(32)') of ...: unknown op 'resise'; known ops: ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from data.config_blocks import (
    build_or_raise,
    int_at_least,
    optional,
    setting,
    string,
)
from data.preprocess import PreprocessError, parse_pp
from data.registry import RegistryError
from data.sources import SOURCES


def _plain(value: Any) -> Any:
    """A ConfigDict as its dict, anything else unchanged."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def _source(value: Any) -> str | None:
    """The rule a source mapping breaks: a known name, and options that fit that source."""
    options = _plain(value)
    if not isinstance(options, Mapping):
        return f"expected a mapping (name + that source's options), got {type(value).__name__}"
    options = dict(options)
    name = options.pop("name", None)
    if name is None:
        return f"needs a 'name'; known: {SOURCES.known()}"
    if not isinstance(name, str) or name not in SOURCES:
        return f"unknown source name {name!r}; known: {SOURCES.known()}"
    try:
        SOURCES.check_arguments(name, (), options)
    except RegistryError as error:
        return str(error)
    return None


def _op_string(value: Any) -> str | None:
    """The rule an op string breaks: it must parse and build (data/preprocess.py)."""
    problem = string(value)
    if problem:
        return problem
    try:
        parse_pp(value)
    except PreprocessError as error:
        return str(error)
    return None


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """A validated config.input block (see the module docstring for the meaning of fields)."""

    source: dict[str, Any] = setting(check=_source)
    pp: str = setting(check=_op_string)
    batch_size: int = setting(check=int_at_least(1))
    shuffle_buffer: int = setting(10_000, int_at_least(0))
    seed: int = setting(0, int_at_least(0))
    prefetch: int = setting(2, int_at_least(0))
    num_epochs: int | None = setting(None, optional(int_at_least(1)))
    max_text_bytes: int = setting(4096, int_at_least(1))

    @property
    def source_name(self) -> str:
        return self.source["name"]

    @property
    def source_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.source.items() if k != "name"}


def validate_input_config(block: Any, where: str = "input") -> InputConfig:
    """Checks an input block (ConfigDict or mapping) and returns it as an InputConfig.

    where: the block's place in the config ("input", "evals.NAME.input"), naming its keys in
        the problem lines.
    Raises ConfigError naming unknown keys, missing keys, wrongly typed values, bad ranges,
    unknown sources or source options, and op-string errors.
    """
    config = build_or_raise(InputConfig, block, where)
    # A plain dict of its own, whatever mapping the config held.
    return dataclasses.replace(config, source=dict(_plain(config.source)))
