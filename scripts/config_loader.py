"""Configs as code: "configs/NAME.py[:arg]" -> get_config(arg), plus "a.b=value" overrides.

    config = load_config("configs/demo.py:loss=clip", ["optim.lr=3e-4", "total_steps=100"])

On a command line the overrides follow --config as "--config.a.b=value" (or "--config.a.b value");
`split_overrides` takes them out of argv before argparse sees the rest.

Overrides are parsed as Python literals (falling back to a plain string) and must name an existing
field; ml_collections then refuses a value of the wrong type, naming the field. The training
length is the exception: a config holds exactly one of total_steps, total_epochs and
total_examples, so overriding any of them sets it (added if absent) and removes the other two.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

OVERRIDE_HELP = (
    "configs/NAME.py[:arg]; override any field with --config.a.b=value (e.g. "
    "--config.optim.lr=3e-4); --config.total_steps, --config.total_epochs or "
    "--config.total_examples replaces the config's training length"
)


def add_config_flag(
    parser: argparse.ArgumentParser, *, default: str | None = None
) -> argparse.Action:
    """Adds --config (required unless a default is given), its help naming the override form."""
    return parser.add_argument(
        "--config", required=default is None, default=default, help=OVERRIDE_HELP
    )


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates "--config.a.b=value" (or "--config.a.b value") overrides from other arguments:
    returns (["a.b=value", ...], the other arguments in order)."""
    overrides, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                value = next(args, None)
                if value is None:
                    raise ValueError(f"{arg} needs a value: {arg}=VALUE or {arg} VALUE")
                body = f"{body}={value}"
            overrides.append(body)
        else:
            rest.append(arg)
    return overrides, rest


def parse_args_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """parser.parse_args on argv (default: sys.argv[1:]) without its --config.a.b overrides;
    returns (args, overrides). A malformed override exits like any bad flag."""
    try:
        overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        parser.error(str(error))
    return parser.parse_args(rest), overrides


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of "path.py[:arg]" with the overrides applied; a missing file, a bad arg or a
    bad override raises ConfigError (all bad overrides at once)."""
    from data.config_blocks import ConfigError

    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"no config file {path} (--config takes configs/NAME.py[:arg])")
    module_spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as error:  # get_config's own check of its argument
        raise ConfigError(f"{spec}: {error}") from None
    problems = []
    for override in overrides:
        try:
            apply_override(config, override)
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)
    return config


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set config.<dotted key> from "dotted.key=value"; unknown keys and bad types raise
    ConfigError.

    A top-level duration (total_steps, total_epochs, total_examples) replaces the others."""
    # Imported here: the schema module loads TensorFlow, which entry points import only after
    # parsing their flags (scripts/terminal.py).
    from contrastive.config_schema import DURATIONS, TOP_LEVEL_KEYS
    from data.config_blocks import ConfigError
    from models.heteroscedastic.sampling import MOVED_KEYS

    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value")
    if key in DURATIONS:
        _set_duration(config, key, text, override)
        return
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if part not in node:
            raise ConfigError(
                f"override {override!r}: config has no {'.'.join(parents[: depth + 1])}"
            )
        node = node[part]
    if leaf not in node and not parents and key in TOP_LEVEL_KEYS:
        # An optional top-level setting the config leaves out (e.g. init_from, accum_steps).
        with config.unlocked():
            config[key] = parse_value(text)
        return
    if leaf not in node:
        moved = MOVED_KEYS.get(tuple(key.split(".")))
        where = f"; it has moved to {moved}" if moved else ""
        raise ConfigError(f"override {override!r}: config has no {key}{where}")
    value = parse_value(text)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (
        current is not None
        and value is not None
        and isinstance(value, str) != isinstance(current, str)
    ):
        raise ConfigError(f"override {override!r}: {key} is {type(current).__name__}, got {text!r}")
    try:
        node[leaf] = value
    except TypeError as error:
        raise ConfigError(f"override {override!r}: {error}") from None


def _set_duration(config: ml_collections.ConfigDict, key: str, text: str, override: str) -> None:
    from contrastive.config_schema import DURATIONS
    from data.config_blocks import ConfigError

    value = parse_value(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"override {override!r}: {key} must be a number, got {text!r}")
    if key != "total_epochs":
        if not float(value).is_integer():
            raise ConfigError(f"override {override!r}: {key} must be a whole number, got {text!r}")
        value = int(value)
    if value <= 0:
        raise ConfigError(f"override {override!r}: {key} must be positive, got {text!r}")
    with config.unlocked():
        for other in DURATIONS:
            if other != key and other in config:
                del config[other]
        # Removed first: ml_collections keeps a field's type, and total_epochs may be an int
        # in one config and a float in the override.
        if key in config:
            del config[key]
        config[key] = value
