"""What a config trains, built in one place for training, evaluation, validation and the
benchmark: the task (model, objective, initial parameters), the run's length, and
`build_experiment` (optimizer, schedule, frozen mask, state and step) on top of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from contrastive.accumulation import accumulated_contrastive_value_and_grad
from contrastive.freezing import frozen_mask, group_masks
from contrastive.losses import make_loss
from contrastive.objectives import classification_objective, contrastive_objective
from contrastive.optim import make_optimizer
from contrastive.step import (
    abstract_params,
    abstract_train_state,
    init_train_state,
    make_train_step,
)
from data.config import InputConfig, validate_input_config
from data.config_blocks import ConfigError, build_or_raise
from data.sources import make_source
from models.classifier import ImageClassifier
from models.heteroscedastic import NoiseConfig, Sampling, TemperatureConfig
from models.two_towers import example_inputs, load_pretrained_towers, two_towers_from_config


@dataclasses.dataclass
class Task:
    """What differs between methods: the model, its objective, and how parameters start."""

    model: Any
    objective: Callable
    init_params: Callable[[jax.Array], Any]
    load_params: Callable[[Any], Any] | None
    loss: Any = None  # the contrastive loss (None for classification)


def sampling_from_config(values: Mapping[str, Any]) -> Sampling:
    """The run's one Monte-Carlo sampling block (defaults where the config leaves it out);
    ConfigError lists every problem with it."""
    return build_or_raise(Sampling, values.get("sampling"), "sampling")


def loss_from_config(values: Mapping[str, Any]):
    loss = dict(values.get("loss") or {})
    if "name" not in loss:
        raise ValueError("loss needs a 'name' (clip, siglip or hetxl)")
    if loss["name"] == "hetxl":
        loss["sampling"] = sampling_from_config(values)
    return make_loss(**loss)


def classifier_from_config(values: Mapping[str, Any]) -> ImageClassifier:
    model = dict(values["model"])
    return ImageClassifier(
        image_tower=dict(model["image_tower"]),
        num_classes=model["num_classes"],
        head=model.get("head", "hetxl"),
        likelihood=model.get("likelihood", "softmax"),
        noise=NoiseConfig(**dict(model.get("noise") or {})),
        temperature=TemperatureConfig(**dict(model.get("temperature") or {})),
        sampling=sampling_from_config(values),
    )


def build_model(values: Mapping[str, Any]) -> tuple[Any, Callable[[jax.Array], Any]]:
    """The model of a validated config and its parameter initialiser (key -> params)."""
    if values["task"] == "classification":
        model = classifier_from_config(values)
        size = values["model"]["image_size"]
        images = np.zeros((1, size, size, 3), np.float32)
        labels = np.zeros((1,), np.int32)

        def init_classifier(key):
            noise_key, params_key = jax.random.split(key)
            rngs = {"params": params_key, "noise": noise_key}
            return model.init(rngs, images, labels, train=True)["params"]

        return model, init_classifier

    model = two_towers_from_config(values["model"])
    images, tokens = example_inputs(values["model"])

    def init_two_towers(key):
        return model.init(key, images, tokens)["params"]

    return model, init_two_towers


def build_task(values: Mapping[str, Any], mesh) -> Task:
    """The model, objective and parameter initialisers of a validated config."""
    model, init_params = build_model(values)
    if values["task"] == "classification":
        return Task(model, classification_objective(model), init_params, None)
    model_init = values.get("model_init") or {}
    load = None
    if model_init.get("image") or model_init.get("text"):

        def load(params):
            return load_pretrained_towers(params, model_init.get("image"), model_init.get("text"))

    loss = loss_from_config(values)
    return Task(model, contrastive_objective(model, loss, mesh), init_params, load, loss)


def total_steps(values: Mapping[str, Any], train_examples: int | None) -> int:
    """Training length in steps from total_steps, total_epochs or total_examples."""
    batch = values["input"]["batch_size"]
    if values.get("total_steps") is not None:
        return int(values["total_steps"])
    if values.get("total_examples") is not None:
        return max(1, math.ceil(values["total_examples"] / batch))
    if train_examples is None:
        raise ConfigError("total_epochs needs a source of known size; give total_steps instead")
    return max(1, math.ceil(values["total_epochs"] * train_examples / batch))


def resolve_total_steps(values: Mapping[str, Any], train_input: InputConfig | None = None) -> int:
    """total_steps(), reading the training source's size only when the length is in epochs.

    train_input: the config's input block already validated, if the caller has it.
    """
    train_examples = None
    if values.get("total_epochs") is not None:
        train_input = train_input or validate_input_config(values["input"])
        source = make_source(train_input.source_name, **train_input.source_options)
        train_examples = source.num_examples()
    return total_steps(values, train_examples)


@dataclasses.dataclass
class Experiment:
    """Everything a validated config builds before data flows: what the trainer trains, what the
    benchmark times and what evaluation restores into.

    num_steps: the run's length in updates; schedule(step) is the learning rate the optimizer
    applies at update `step` (0-based); frozen: tree of bools (LiT) or None.
    """

    values: dict
    mesh: Any
    task: Task
    num_steps: int
    optimizer: Any
    schedule: Callable[[int], Any]
    frozen: Any
    rng: jax.Array
    norm_groups: dict[str, Any] | None = None

    def abstract_state(self):
        """(TrainState of sharded ShapeDtypeStructs, shardings): what a full restore needs."""
        return abstract_train_state(self.task.init_params, self.optimizer, self.rng, self.mesh)

    def abstract_params(self):
        """The parameters as sharded ShapeDtypeStructs: what a parameters-only restore needs."""
        return abstract_params(self.task.init_params, self.rng, self.mesh)

    def init_state(self, load_params: Callable[[Any], Any] | None = None):
        """(fresh TrainState in its shardings, shardings); load_params as in init_train_state,
        default: the task's own (pretrained towers, if any)."""
        load = self.task.load_params if load_params is None else load_params
        return init_train_state(
            self.task.init_params, self.optimizer, self.rng, self.mesh, load_params=load
        )

    def train_step(self, shardings, prepare_batch: Callable | None = None):
        """The jitted update step; with accum_steps > 1 its gradient is accumulated over
        microbatches that keep every negative of the full batch."""
        accum_steps = self.values["accum_steps"]
        value_and_grad = None
        if accum_steps > 1:
            value_and_grad = accumulated_contrastive_value_and_grad(
                self.task.model, self.task.loss, self.mesh, accum_steps, frozen=self.frozen
            )
        return make_train_step(
            self.task.objective,
            self.optimizer,
            self.mesh,
            shardings,
            self.frozen,
            value_and_grad,
            prepare_batch=prepare_batch,
            norm_groups=self.norm_groups,
        )


def build_experiment(values: Mapping[str, Any], mesh) -> Experiment:
    """The Experiment of a validated config (contrastive.validation.validate_config) on a mesh."""
    task = build_task(values, mesh)
    rng = jax.random.key(values["seed"])
    num_steps = resolve_total_steps(values)
    param_shapes = jax.eval_shape(task.init_params, rng)
    optim = dict(values["optim"])
    optimizer, schedule = make_optimizer(optim, num_steps, param_shapes)
    freeze_rules = optim.get("freeze") or []
    frozen = frozen_mask(param_shapes, freeze_rules) if freeze_rules else None
    groups = values.get("grad_norm_groups")
    norm_groups = group_masks(param_shapes, dict(groups)) if groups else None
    return Experiment(
        dict(values), mesh, task, num_steps, optimizer, schedule, frozen, rng, norm_groups
    )
