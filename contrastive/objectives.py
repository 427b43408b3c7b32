"""Objectives the one train step optimises: (params, batch, rng) -> (loss, metrics).

contrastive: two towers + a sharded contrastive loss (clip, siglip, hetxl).
classification: an image classifier with a DET / HET / HET-XL head; minus the (MC) log-likelihood
of the labels. Its batch is split over the mesh by the step's input sharding and XLA partitions
the computation, so no explicit collectives are needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from contrastive.losses import shard_loss
from contrastive.mesh import BATCH_AXES

Objective = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def contrastive_objective(model: nn.Module, loss, mesh: Mesh) -> Objective:
    """Two-tower forward (train mode) followed by a sharded contrastive loss."""
    sharded_loss = shard_loss(loss, mesh, BATCH_AXES)

    def objective(params, batch, rng):
        dropout_rng, loss_rng = jax.random.split(rng)
        outputs = model.apply(
            {"params": params},
            batch["image"],
            batch["text"],
            train=True,
            rngs={"dropout": dropout_rng},
        )
        loss_value, metrics = sharded_loss(outputs, loss_rng)
        metrics = dict(metrics)
        metrics["image_norm"] = jnp.mean(outputs["image_norm"])
        metrics["text_norm"] = jnp.mean(outputs["text_norm"])
        return loss_value, metrics

    return objective


def classification_objective(model: nn.Module) -> Objective:
    """Mean negative (MC) log-likelihood of batch["label"] (class ids, or multi-hot targets for a
    sigmoid head); the head's temperature is reported as "tau"."""

    def objective(params, batch, rng):
        dropout_rng, noise_rng = jax.random.split(rng)
        log_lik, state = model.apply(
            {"params": params},
            batch["image"],
            batch["label"],
            train=True,
            rngs={"dropout": dropout_rng, "noise": noise_rng},
            mutable=["intermediates"],
        )
        tau = state["intermediates"]["classifier"]["tau"][0]
        return -jnp.mean(log_lik), {"tau": tau}

    return objective
