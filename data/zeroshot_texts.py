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
    check_templates(templates)
    return [template.replace("{c}", name) for name in classnames for template in templates]


def check_templates(templates: list[str]) -> None:
    """Raises ValueError unless there is at least one template and each has a "{c}"."""
    if not templates:
        raise ValueError("zero-shot needs at least one prompt template")
    missing = [template for template in templates if "{c}" not in template]
    if missing:
        raise ValueError(f"prompt templates need '{{c}}' where the class name goes: {missing[:3]}")


# TFDS datasets whose ClassLabel classes clip_benchmark names for prompts (same classes in the
# same order: clip_benchmark reads these very TFDS datasets for its VTAB tasks), and TFDS datasets
# for which it only has templates.
TFDS_CLIP_BENCHMARK_KEYS = {
    "imagenet2012": "imagenet1k",
    "imagenet_v2": "imagenet1k",
    "imagenet2012_real": "imagenet1k",
    "imagenet_sketch": "imagenet1k",
    "caltech101": "caltech101_vtab",
    "oxford_flowers102": "flowers",
    "oxford_iiit_pet": "pets",
    "mnist": "mnist",
    "svhn_cropped": "svhn",
    "eurosat": "eurosat",
    "patch_camelyon": "pcam",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "dmlab": "dmlab",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "dtd": "dtd",
    "food101": "food101",
    "stl10": "stl10",
    "sun397": "sun397",
    "resisc45": "resisc45",
    "cars196": "cars",
}


def readable_label(name: str) -> str:
    """A label string as a prompt can use it: "aquarium_fish" -> "aquarium fish"."""
    return " ".join(name.replace("_", " ").split())


def tfds_classnames_and_templates(
    dataset: str, label_names: list[str]
) -> tuple[list[str], list[str]]:
    """(class names, templates) for a TFDS dataset ("name[/config][:version]") whose ClassLabel
    has label_names.

    clip_benchmark's prompt-ready names are used when it has them for this dataset and their
    count matches; otherwise the ClassLabel names, with underscores as spaces. Templates are
    clip_benchmark's for the dataset, or CLIP's 80 ImageNet templates.
    """
    base = dataset.split(":")[0].split("/")[0]
    key = TFDS_CLIP_BENCHMARK_KEYS.get(base)
    known_names = _load_json("en_classnames.json").get(key)
    if known_names is not None and len(known_names) == len(label_names):
        classnames = list(known_names)
    else:
        classnames = [readable_label(name) for name in label_names]
    templates = _load_json("en_zeroshot_classification_templates.json").get(key)
    return classnames, list(templates) if templates else clip_templates()
