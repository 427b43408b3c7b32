"""A small, explicit name -> factory registry with argument checking.

Entries are added with a decorator in the module that defines them (no discovery by import side
effects elsewhere), and every call through the registry is checked against the factory's signature
and type hints *before* the factory runs, so that a bad preprocessing string or config fails at
validation time with a message that names the entry, the argument and the known alternatives.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class RegistryError(ValueError):
    """An unknown name, or arguments that do not fit a registered factory."""


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved type hints of the parameters of a function, or of a class's __init__.

    The return hint is left unresolved: it often names a TensorFlow type, and resolving it would
    import TensorFlow (data/lazy_tf.py) where only a config is being checked.
    """
    target = fn.__init__ if isinstance(fn, type) else fn
    annotations = getattr(target, "__annotations__", None) or {}
    parameters = types.SimpleNamespace(
        __annotations__={name: hint for name, hint in annotations.items() if name != "return"}
    )
    # Names in the hints resolve where the function was written (past any decorator's wrapper).
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    return typing.get_type_hints(parameters, globalns=namespace)


def matches_type(value: Any, tp: Any) -> bool:
    """Whether a literal value fits a type hint (the subset used by registered factories).

    Supported hints: bool, int, float (ints accepted), str, None, unions, Any,
    tuple[X, ...] / tuple[X, Y] and Sequence[X] (lists and tuples).
    """
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        # bool is a subclass of int in Python; resize(True) is a mistake, not a size.
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches_type(v, args[0]) for v in value)
        if len(value) != len(args):
            return False
        return all(matches_type(v, a) for v, a in zip(value, args, strict=True))
    if origin in (Sequence, list):
        (item_type,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (tuple, list)) and all(matches_type(v, item_type) for v in value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"unsupported type hint in a registered factory: {tp!r}")


class Registry:
    """Maps names to factories; `build(name, *args, **kwargs)` checks arguments, then calls.

    Args:
      kind: what the entries are, used in error messages ("preprocessing op", "source").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator adding `fn` under `name`; a second registration of a name is an error."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            # Resolve hints now so a broken annotation fails at import, not at first use.
            _hints(fn)
            self._factories[name] = fn
            return fn

        return add

    def known(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        """The factory registered under `name`; unknown names list the known ones."""
        if name not in self._factories:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.known())}")
        return self._factories[name]

    def usage(self, name: str) -> str:
        """`name(arg: type = default, ...)`, from the factory's signature and resolved hints."""
        fn = self.get(name)
        hints = _hints(fn)
        parts = []
        for param in inspect.signature(fn).parameters.values():
            prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
            text = prefix.get(param.kind, "") + param.name
            if param.name in hints:
                text += f": {type_name(hints[param.name])}"
            if param.default is not inspect.Parameter.empty:
                text += f" = {param.default!r}"
            parts.append(text)
        return f"{name}({', '.join(parts)})"

    def check_arguments(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raises RegistryError when args/kwargs do not bind to `name`'s signature or hints."""
        fn = self.get(name)
        signature = inspect.signature(fn)
        usage = self.usage(name)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise RegistryError(f"{self.kind} {name!r}: {e}; usage: {usage}") from None
        hints = _hints(fn)
        for arg_name, value in bound.arguments.items():
            hint = hints.get(arg_name, Any)
            kind = signature.parameters[arg_name].kind
            # *args and **kwargs are annotated with the type of each item.
            if kind is inspect.Parameter.VAR_POSITIONAL:
                items = list(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                items = list(value.values())
            else:
                items = [value]
            for item in items:
                if not matches_type(item, hint):
                    raise RegistryError(
                        f"{self.kind} {name!r}: argument {arg_name}={item!r} should be "
                        f"{type_name(hint)}; usage: {usage}"
                    )

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Checks the arguments, then calls the factory."""
        self.check_arguments(name, args, kwargs)
        return self.get(name)(*args, **kwargs)
