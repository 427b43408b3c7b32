"""Class names and prompt templates for zero-shot classification.

Zero-shot evaluation embeds "template filled with class name" for every class and template and
classifies an image by its nearest class. The templates are CLIP's 80 ImageNet prompts
(clip_benchmark's en_zeroshot_classification_templates.json, key "imagenet1k"); training captions
must never equal one of these prompts (data/captions.py enforces it), or the evaluation would
measure memorisation of the prompt rather than zero-shot transfer.
"""

from __future__ import annotations

import functools
import json

from data.package_files import clip_benchmark_file

# Names written for prompts ("a photo of a {c}."), not the dataset's label strings
# ("T-shirt/top", "Trouser"), which read badly inside a sentence.
FASHION_MNIST_CLASSNAMES = (
    "T-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

CLIP_TEMPLATES_KEY = "imagenet1k"


@functools.cache
def _load_json(name: str) -> dict:
    with open(clip_benchmark_file(name), encoding="utf-8") as f:
        return json.load(f)


def clip_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates; "{c}" marks where the class name goes."""
    return list(_load_json("en_zeroshot_classification_templates.json")[CLIP_TEMPLATES_KEY])


def imagenet_classnames() -> list[str]:
    """The 1,000 ImageNet class names used by CLIP's zero-shot evaluation."""
    return list(_load_json("en_classnames.json")["imagenet1k"])


def known_datasets() -> list[str]:
    """Dataset names accepted by classnames_and_templates."""
    classnames = _load_json("en_classnames.json")
    templates = _load_json("en_zeroshot_classification_templates.json")
    return sorted({"fashion_mnist", *(set(classnames) & set(templates))})


def classnames_and_templates(dataset: str) -> tuple[list[str], list[str]]:
    """(class names in label order, prompt templates with "{c}") for a zero-shot dataset.

    "fashion_mnist" uses this project's class names with CLIP's 80 ImageNet templates;
    "imagenet1k" (and the other clip_benchmark datasets with both files) come from the JSON files.
    """
    if dataset == "fashion_mnist":
        return list(FASHION_MNIST_CLASSNAMES), clip_templates()
    classnames = _load_json("en_classnames.json")
    templates = _load_json("en_zeroshot_classification_templates.json")
    if dataset not in classnames or dataset not in templates:
        raise ValueError(
            f"no zero-shot class names/templates for {dataset!r}; known: {known_datasets()}"
        )
    return list(classnames[dataset]), list(templates[dataset])


def zero_shot_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Every template filled with every class name, class-major: [C * T] strings."""
    return [template.replace("{c}", name) for name in classnames for template in templates]
