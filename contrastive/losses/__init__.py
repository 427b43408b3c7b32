"""Contrastive losses over a device mesh, by name.

Each loss is a frozen dataclass of options whose __call__(outputs, rng, axis_names) runs on ONE
device's shard of the global batch (inside shard_map) and returns (loss, metrics), both already
reduced over the batch axes. `shard_loss(loss, mesh, batch_axes)` turns it into a function of
global arrays. See sharding.py for the gather-with-gradient and chunking scheme.
"""

from __future__ import annotations

from contrastive.losses.clip import ClipLoss
from contrastive.losses.hetxl import HetXLLoss
from contrastive.losses.sharding import shard_loss
from contrastive.losses.siglip import SigLipLoss

LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss, "hetxl": HetXLLoss}


def make_loss(name: str, **options):
    """The loss registered under name, built with its options (unknown names/options: error)."""
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} is unknown; known: {sorted(LOSSES)}")
    cls = LOSSES[name]
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"bad options for loss {name!r}: {error}") from error


__all__ = ["LOSSES", "ClipLoss", "HetXLLoss", "SigLipLoss", "make_loss", "shard_loss"]
