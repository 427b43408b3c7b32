"""What a config trains: the task (model, objective, initial parameters) and the run's length.

Shared by training, evaluation, validation and the benchmark, so that each builds the same model
from the same config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from contrastive.config_schema import ConfigError
from contrastive.losses import make_loss
from contrastive.objectives import classification_objective, contrastive_objective
from data.config import validate_input_config
from data.sources import make_source
from models.classifier import ImageClassifier
from models.heteroscedastic import NoiseConfig, TemperatureConfig
from models.two_towers import example_inputs, load_pretrained_towers, two_towers_from_config


@dataclasses.dataclass
class Task:
    """What differs between methods: the model, its objective, and how parameters start."""

    model: Any
    objective: Callable
    init_params: Callable[[jax.Array], Any]
    load_params: Callable[[Any], Any] | None
    loss: Any = None  # the contrastive loss (None for classification)


def loss_from_config(values: Mapping[str, Any]):
    loss = dict(values.get("loss") or {})
    if "name" not in loss:
        raise ValueError("loss needs a 'name' (clip, siglip or hetxl)")
    return make_loss(**loss)


def classifier_from_config(model: Mapping[str, Any]) -> ImageClassifier:
    model = dict(model)
    return ImageClassifier(
        image_tower=dict(model["image_tower"]),
        num_classes=model["num_classes"],
        head=model.get("head", "hetxl"),
        likelihood=model.get("likelihood", "softmax"),
        noise=NoiseConfig(**dict(model.get("noise") or {})),
        temperature=TemperatureConfig(**dict(model.get("temperature") or {})),
    )


def build_model(values: Mapping[str, Any]) -> tuple[Any, Callable[[jax.Array], Any]]:
    """The model of a validated config and its parameter initialiser (key -> params)."""
    if values["task"] == "classification":
        model = classifier_from_config(values["model"])
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


def resolve_total_steps(values: Mapping[str, Any]) -> int:
    """total_steps(), reading the training source's size only when the length is in epochs."""
    train_examples = None
    if values.get("total_epochs") is not None:
        train_input = validate_input_config(values["input"])
        source = make_source(train_input.source_name, **train_input.source_options)
        train_examples = source.num_examples()
    return total_steps(values, train_examples)
