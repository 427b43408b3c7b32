"""Config blocks as frozen dataclasses, each carrying its defaults and its checks.

A block is a frozen dataclass whose fields are declared with `setting(default, check)`: the
default is used where the config leaves the key out, and `check(value)` returns what is wrong
with a given value (or None). A cross-field rule lives in the class's `problems(self)` method,
which returns lines "key: problem". `build_block(cls, values, where)` reads a mapping into the
class and reports every problem at once, one line each, naming `where.key` (`build_or_raise`
raises them as one ConfigError):

    checkpoint: expected a mapping, got str
    checkpoint: unknown key(s) ['kep']; known: ['async_save', 'directory', 'every_steps', 'keep']
    checkpoint.keep=0: expected an integer >= 1
    mesh.fsdp: only one of data, fsdp may be -1

It lives in data/ because that is the lowest package every config reader may import (the input
block here, the optimizer, evaluator and trainer blocks in contrastive/); models/ may import
neither, so its classes check themselves in __post_init__ instead. `ConfigError` is the one error
a config mistake raises, wherever it is found.

Kept free of heavy imports, so that a config is checked in well under a second. The checks
below (`real`, `int_at_least`, `one_of`, ...) return the rule a value breaks; the caller says
which key and value it was.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Check = Callable[[Any], "str | None"]


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


def setting(default: Any = dataclasses.MISSING, check: Check | None = None, **field_options):
    """A dataclass field with its default and the check of a given value."""
    return dataclasses.field(default=default, metadata={"check": check}, **field_options)


def build_block(cls: type, values: Any, where: str) -> tuple[Any, list[str]]:
    """(cls(**values) with defaults filled in, []) or (None, every problem, one line each).

    `values` is a mapping (a ConfigDict is read as its dict); None means all defaults. Problems:
    a non-mapping, unknown keys, missing required keys, values failing their field's check, a
    ValueError from the class's own __post_init__ ("; " separates several), and whatever
    `cls.problems(instance)` returns once every value passes its own check.
    """
    if values is None:
        values = {}
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    if not isinstance(values, Mapping):
        return None, [f"{where}: expected a mapping, got {type(values).__name__}"]
    fields = {field.name: field for field in dataclasses.fields(cls)}
    problems = []
    unknown = sorted(set(values) - set(fields))
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    for name, field in fields.items():
        if name not in values:
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if required:
                problems.append(f"{where}.{name}: missing (required)")
            continue
        check = field.metadata.get("check")
        problem = check(values[name]) if check else None
        if problem:
            problems.append(f"{where}.{name}={values[name]!r}: {problem}")
    if problems:
        return None, problems
    try:
        # A class may check itself in __post_init__ (models' dataclasses do: they cannot import
        # this module); its ValueError is a problem of the block like any other.
        instance = cls(**{name: values[name] for name in fields if name in values})
    except ValueError as error:
        lines = [line for line in str(error).split("; ") if line]
        # "key=value: rule" lines name their key like the field checks do.
        return None, [
            f"{where}.{line}" if line.split("=")[0] in fields else f"{where}: {line}"
            for line in lines
        ]
    cross = instance.problems() if hasattr(instance, "problems") else []
    if cross:
        return None, [f"{where}.{line}" for line in cross]
    return instance, []


def build_or_raise(cls: type, values: Any, where: str) -> Any:
    """`values` built as the block `cls` (defaults where it leaves keys out); ConfigError lists
    every problem with it."""
    block, problems = build_block(cls, values, where)
    if problems:
        raise ConfigError(problems)
    return block


def defaults(cls: type) -> dict[str, Any]:
    """{key: default} of a block's fields that have one."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values


# ----------------------------------------------------------------------------------------------
# Checks: each returns the rule a value breaks, or None when it is fine.


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value: Any) -> str | None:
    return None if is_int(value) else "expected an integer"


def real(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: Any) -> str | None:
        if not is_real(value) or not math.isfinite(value):
            return f"expected a finite number in {interval}"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            return f"expected a number in {interval}"
        return None

    return check


def optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def int_at_least(low: int) -> Check:
    def check(value: Any) -> str | None:
        if not is_int(value) or value < low:
            return f"expected an integer >= {low}"
        return None

    return check


def one_of(choices: Sequence[Any]) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or value not in choices:
            return f"expected one of {list(choices)}"
        return None

    return check


def either(first: Check, second: Check, rule: str) -> Check:
    """Fine when either check passes; `rule` describes both."""
    return lambda value: None if not first(value) or not second(value) else rule


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected True or False"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else "expected a string"


def strings(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return None
    return "expected a list of strings"


def regexes(value: Any) -> str | None:
    if strings(value):
        return "expected a list of regex strings"
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            return f"{pattern!r} is not a valid regex ({err})"
    return None


def mapping(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return None
    return f"expected a mapping (e.g. ConfigDict.to_dict()), got {type(value).__name__}"
