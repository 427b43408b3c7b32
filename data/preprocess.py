"""Parser of preprocessing op strings: "decode|resize(64)|flip_lr|value_range(-1, 1)|tokenize(16)".

An op string is ops separated by "|". Each op is a registered name (data/ops.py), optionally called
with Python literal arguments, positional and keyword: `resize(64)`, `resize((48, 64))`,
`tokenize(max_len=16, key='text')`, `keep('image', 'text')`. Arguments are literals only (parsed
with `ast`, never evaluated), so an op string is data, not code.

`parse_pp` checks the whole string (known names, argument count, types, keywords) and builds every
op before returning, so a typo fails when the config is validated, not hours into a run.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

from data.lazy_tf import tf
from data.ops import PP_OPS, Example
from data.registry import Registry, RegistryError


class PreprocessError(ValueError):
    """An op string that cannot be parsed or built; the message names the offending op."""


def split_ops(pp: str) -> list[str]:
    """Splits at top-level "|" (not inside quotes or brackets) and strips each op."""
    ops, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(pp):
        if quote:
            if ch == quote and pp[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "|" and depth == 0:
            ops.append(pp[start:i].strip())
            start = i + 1
    ops.append(pp[start:].strip())
    return ops


def parse_op(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """ "resize(64, key='image')" -> ("resize", (64,), {"key": "image"}); syntax only."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise PreprocessError(f"cannot parse op {text!r}: expected name or name(args)") from None
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise PreprocessError(f"cannot parse op {text!r}: expected name or name(args)")
    name = node.func.id
    args, kwargs = [], {}
    for position, arg in enumerate(node.args):
        try:
            args.append(ast.literal_eval(arg))
        except ValueError:
            raise PreprocessError(
                f"op {name!r}: argument {position + 1} ({ast.unparse(arg)}) is not a literal"
            ) from None
    for keyword in node.keywords:
        if keyword.arg is None:
            raise PreprocessError(f"op {name!r}: **kwargs are not supported")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise PreprocessError(
                f"op {name!r}: argument {keyword.arg}={ast.unparse(keyword.value)} is not a literal"
            ) from None
    return name, tuple(args), kwargs


class PreprocessFn:
    """A parsed op string: calling it applies the ops in order to one example (dict of tensors).

    Attributes:
      pp: the op string it was parsed from.
      ops: (name, args, kwargs) of each op, in order.
      fns: the built op of each entry of `ops` (example -> example).
    """

    def __init__(
        self,
        pp: str,
        ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
        fns: list[Callable[[Example], Example]],
    ) -> None:
        self.pp = pp
        self.ops = ops
        self.fns = fns

    def __call__(self, data: Example) -> Example:
        """Applies every op; input and output are unbatched dicts of tf tensors."""
        data = dict(data)
        for fn in self.fns:
            data = fn(data)
        return data

    def __repr__(self) -> str:
        return f"PreprocessFn({self.pp!r})"


def parse_pp(pp: str, registry: Registry = PP_OPS) -> PreprocessFn:
    """Parses and builds an op string; raises PreprocessError naming the bad op and the known ops.

    An empty string is the identity.
    """
    if not isinstance(pp, str):
        raise PreprocessError(f"an op string must be str, got {type(pp).__name__}")
    if not pp.strip():
        return PreprocessFn(pp, [], [])
    ops, fns = [], []
    for index, text in enumerate(split_ops(pp)):
        where = f"op {index + 1} ({text!r}) of {pp!r}"
        if not text:
            raise PreprocessError(f"empty op at position {index + 1} of {pp!r}")
        name, args, kwargs = parse_op(text)
        known = f"known ops: {', '.join(registry.known())}"
        if name not in registry:
            raise PreprocessError(f"{where}: unknown op {name!r}; {known}")
        try:
            registry.check_arguments(name, args, kwargs)
        except RegistryError as e:
            raise PreprocessError(f"{where}: {e}; {known}") from None
        try:
            fns.append(registry.get(name)(*args, **kwargs))
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise PreprocessError(f"{where}: {e}") from e
        ops.append((name, args, kwargs))
    return PreprocessFn(pp, ops, fns)


def bound_arguments(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], registry: Registry = PP_OPS
) -> dict[str, Any]:
    """Every argument of the registered op `name` as an op string calls it, defaults included."""
    bound = inspect.signature(registry.get(name)).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def output_spec(fn: PreprocessFn, input_spec: dict[str, tf.TensorSpec]) -> dict[str, tf.TensorSpec]:
    """The output signature of `fn` on examples of `input_spec`, found by tracing (no data read).

    Tracing also surfaces ops that read absent keys, with the keys the example has.
    """
    traced = tf.function(fn, autograph=False).get_concrete_function(input_spec)
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs
    )
