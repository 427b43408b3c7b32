"""Registry of tower architectures: config name -> constructor returning a flax module.

Every constructor takes `num_classes` (an optional output projection, `None` for none) plus its
own keyword arguments, and the module maps a batch to `(features, aux)`. Registration is this
literal dict, so an unknown name fails at config validation, not at the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from models import bert, text_transformer, vit

TOWERS: dict[str, Callable[..., nn.Module]] = {
    "vit": vit.Model,
    "text_transformer": text_transformer.Model,
    "bert_minilm": bert.Model,
}


def get_tower(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as `name`; raises KeyError listing the known names."""
    if name not in TOWERS:
        raise KeyError(f"Unknown tower {name!r}; known towers: {sorted(TOWERS)}")
    return TOWERS[name]


def build_tower(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """`get_tower(name)(num_classes, **kwargs)`, e.g. build_tower("vit", 512, variant="B/16")."""
    return get_tower(name)(num_classes, **kwargs)
