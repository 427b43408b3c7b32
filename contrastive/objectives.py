"""Objectives the one train step optimises: (params, batch, rng) -> (loss, metrics).

contrastive: two towers + a sharded contrastive loss (clip, siglip, hetxl).
classification: an image classifier with a DET / HET / HET-XL head; minus the (MC) log-likelihood
of the labels. Its batch is split over the mesh by the step's input sharding and XLA partitions
the computation, so no explicit collectives are needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from contrastive.losses import shard_loss
from contrastive.mesh import BATCH_AXES

Objective = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ContrastiveObjective:
    """Two-tower forward (train mode) followed by a sharded contrastive loss, as an Objective.

    Its three parts are public so that gradient accumulation (contrastive/accumulation.py) runs
    the forward in microbatches and scores the reassembled outputs with the same rng use and the
    same metrics, instead of a copy of them.
    """

    model: nn.Module
    sharded_loss: Callable[[dict, jax.Array], tuple[jax.Array, dict]]

    @staticmethod
    def split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(dropout rng of the towers, rng of the loss's noise draws)."""
        dropout_rng, loss_rng = jax.random.split(rng)
        return dropout_rng, loss_rng

    def forward(self, params, images: jax.Array, texts: jax.Array, dropout_rng: jax.Array):
        """The model's outputs (embeddings, noise, tau, bias, norms) for a batch of pairs."""
        return self.model.apply(
            {"params": params}, images, texts, train=True, rngs={"dropout": dropout_rng}
        )

    def score(self, outputs: dict, loss_rng: jax.Array) -> tuple[jax.Array, dict]:
        """(loss, metrics) of the outputs of the whole batch."""
        loss_value, metrics = self.sharded_loss(outputs, loss_rng)
        metrics = dict(metrics)
        metrics["image_norm"] = jnp.mean(outputs["image_norm"])
        metrics["text_norm"] = jnp.mean(outputs["text_norm"])
        return loss_value, metrics

    def __call__(self, params, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        dropout_rng, loss_rng = self.split_rng(rng)
        outputs = self.forward(params, batch["image"], batch["text"], dropout_rng)
        return self.score(outputs, loss_rng)


def contrastive_objective(model: nn.Module, loss, mesh: Mesh) -> ContrastiveObjective:
    """Two-tower forward (train mode) followed by `loss` sharded over the mesh's batch axes."""
    return ContrastiveObjective(model, shard_loss(loss, mesh, BATCH_AXES))


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
        sown = state["intermediates"]["classifier"]
        # tau, and for HET / HET-XL heads the size of their noise (noise_diag_scale, ...).
        return -jnp.mean(log_lik), {name: values[0] for name, values in sown.items()}

    return objective
