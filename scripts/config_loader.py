"""Configs as code: "configs/NAME.py[:arg]" -> get_config(arg), plus "a.b=value" overrides.

    config = load_config("configs/demo.py:loss=clip", ["optim.lr=3e-4", "total_steps=100"])

Overrides are parsed as Python literals (falling back to a plain string) and must name an existing
field; ml_collections then refuses a value of the wrong type, naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} has no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set config.<dotted key> from "dotted.key=value"; unknown keys and bad types raise."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not key=value")
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if part not in node:
            raise KeyError(f"override {override!r}: config has no {'.'.join(parents[: depth + 1])}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"override {override!r}: config has no {key}")
    value = parse_value(text)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (
        current is not None
        and value is not None
        and isinstance(value, str) != isinstance(current, str)
    ):
        raise TypeError(f"override {override!r}: {key} is {type(current).__name__}, got {text!r}")
    try:
        node[leaf] = value
    except TypeError as error:
        raise TypeError(f"override {override!r}: {error}") from error
