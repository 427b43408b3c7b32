"""Freezing parameters by regex (LiT's locked image tower, partial fine-tuning).

A rule is a regular expression fully matched against a parameter's "/"-joined path, e.g.
"img/.*" freezes a whole tower and ".*/encoder_norm/.*" every encoder's final LayerNorm. Frozen
parameters get exactly zero updates and the wrapped optimizer keeps no state for them (no Adam
moments), which is what makes locking a large tower cheap. A rule that matches no parameter is an
error, because a typo would otherwise silently train the tower it was meant to lock.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

FROZEN = "frozen"
TRAINABLE = "trainable"


def _path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def parameter_names(params: Any) -> list[str]:
    """Paths of every leaf of `params`, joined with "/", in tree-flattening order."""
    return [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compiled_rules(params: Any, rules: Sequence[str], what: str) -> tuple[list, list[str]]:
    """(compiled rules, parameter names); ValueError naming every rule that is not a regex or
    that fully matches no parameter. `what` names the rules in the message ("Freeze rule")."""
    compiled = []
    for rule in rules:
        if not isinstance(rule, str):
            raise ValueError(f"{what} {rule!r} is not a string (a regex)")
        try:
            compiled.append(re.compile(rule))
        except re.error as err:
            raise ValueError(f"{what} {rule!r} is not a valid regex: {err}") from None
    names = parameter_names(params)
    unused = [rule.pattern for rule in compiled if not any(rule.fullmatch(n) for n in names)]
    if unused:
        raise ValueError(
            f"{what}s match no parameter: {unused}; parameter names look like {names[:5]}"
        )
    return compiled, names


def frozen_labels(params: Any, rules: Sequence[str]) -> Any:
    """A tree like `params` with "frozen" where any rule fully matches the path, else "trainable".

    Raises ValueError naming every rule that matches no parameter (or that is not a regex).
    """
    compiled, names = _compiled_rules(params, rules, "Freeze rule")
    labels = [FROZEN if any(r.fullmatch(n) for r in compiled) else TRAINABLE for n in names]
    return jax.tree.unflatten(jax.tree.structure(params), labels)


def group_masks(params: Any, groups: Mapping[str, str]) -> dict[str, Any]:
    """{name: tree like `params` with True where the group's regex fully matches the path}, for
    the per-group gradient norms of config.grad_norm_groups. Raises like frozen_labels."""
    names = list(groups)
    compiled, paths = _compiled_rules(params, [groups[n] for n in names], "grad_norm_groups rule")
    structure = jax.tree.structure(params)
    return {
        name: jax.tree.unflatten(structure, [bool(rule.fullmatch(p)) for p in paths])
        for name, rule in zip(names, compiled, strict=True)
    }


def frozen_mask(params: Any, rules: Sequence[str]) -> Any:
    """A tree like `params` with True for the leaves the rules freeze."""
    return jax.tree.map(lambda label: label == FROZEN, frozen_labels(params, rules))


def stop_frozen_gradients(params: Any, frozen: Any) -> Any:
    """Params with the gradient of frozen leaves stopped (frozen: a frozen_mask, or None for
    none), so no backward pass runs through a locked tower."""
    if frozen is None:
        return params
    return jax.tree.map(
        lambda leaf, is_frozen: jax.lax.stop_gradient(leaf) if is_frozen else leaf,
        params,
        frozen,
    )


def freeze(
    optimizer: optax.GradientTransformation, rules: Sequence[str]
) -> optax.GradientTransformation:
    """Wraps `optimizer` so parameters matched by `rules` get zero updates and no state.

    The rules are checked against the parameter tree given to `init`; with no rules the optimizer
    is returned unchanged.
    """
    if not rules:
        return optimizer
    rules = tuple(rules)
    return optax.multi_transform(
        {TRAINABLE: optimizer, FROZEN: optax.set_to_zero()},
        lambda params: frozen_labels(params, rules),
    )


@dataclasses.dataclass(frozen=True)
class FreezeReport:
    """Which parameters the rules freeze; counts are numbers of scalars."""

    frozen: tuple[str, ...]
    trainable: tuple[str, ...]
    frozen_count: int
    trainable_count: int

    def summary(self) -> str:
        total = self.frozen_count + self.trainable_count
        share = self.frozen_count / total if total else 0.0
        return (
            f"frozen {len(self.frozen)} arrays / {self.frozen_count:,} values ({share:.1%}); "
            f"trainable {len(self.trainable)} arrays / {self.trainable_count:,} values"
        )


def report_frozen(params: Any, rules: Sequence[str]) -> FreezeReport:
    """Lists frozen and trainable parameter names; `params` may hold `jax.ShapeDtypeStruct`s."""
    labels = jax.tree.leaves(frozen_labels(params, rules))
    names = parameter_names(params)
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    entries = list(zip(names, sizes, labels, strict=True))
    frozen = [(name, size) for name, size, label in entries if label == FROZEN]
    trainable = [(name, size) for name, size, label in entries if label == TRAINABLE]
    return FreezeReport(
        frozen=tuple(n for n, _ in frozen),
        trainable=tuple(n for n, _ in trainable),
        frozen_count=sum(s for _, s in frozen),
        trainable_count=sum(s for _, s in trainable),
    )
