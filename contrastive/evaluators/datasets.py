"""Evaluation datasets by name: their source block, class names and prompt templates.

Classification (zero-shot) datasets:
  fashion_mnist              the Fashion-MNIST IDX files (test split), this project's class names
  imagenet2012               TFDS imagenet2012, validation split (also "imagenet", "imagenet1k")
  imagenet_v2                TFDS imagenet_v2 (matched-frequency), test split
  tfds:NAME                  any prepared TFDS image classification dataset (NAME may carry
                             "/config" and ":version"); a bare NAME that is none of the above
                             is read as tfds:NAME
  folder:DIR, image_folder   one sub-folder of images per class (image_folder reads data_dir);
                             classes are the sorted folder names
Image-caption (retrieval) datasets:
  fashion_mnist              the test images with the captions the demo trains on
  tfrecord:GLOB              TFRecord shards written by scripts.make_tfrecords

Class names: ImageNet's come from clip_benchmark; TFDS datasets use clip_benchmark's prompt-ready
names where it has them for that dataset, else their ClassLabel names (underscores as spaces);
folders use their names the same way. Templates: clip_benchmark's for the dataset, else CLIP's 80
ImageNet templates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR
from data.image_folder import list_image_folder
from data.lazy_tf import tfds
from data.zeroshot_texts import (
    FASHION_MNIST_CLASSNAMES,
    clip_templates,
    readable_label,
    tfds_classnames_and_templates,
)

TFDS_ALIASES = {
    "imagenet2012": ("imagenet2012", "validation"),
    "imagenet": ("imagenet2012", "validation"),
    "imagenet1k": ("imagenet2012", "validation"),
    "imagenet_v2": ("imagenet_v2", "test"),
}
# Splits tried, in order, for a TFDS dataset given without --split.
DEFAULT_SPLITS = ("test", "validation", "train")


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    """Attributes:
    name: how reports name it.
    source: a config.input.source block.
    classnames: class names in label order (None for image-caption data).
    templates: prompt templates with "{c}" (None for image-caption data).
    crop: photos, resized on the shorter side and centre-cropped; False: resized whole
      (images stored at the model's framing, as Fashion-MNIST).
    """

    name: str
    source: dict[str, Any]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    crop: bool = True


def classification_dataset(
    spec: str, data_dir: str | None = None, split: str | None = None
) -> EvalDataset:
    """A labelled dataset for zero-shot classification, by the names of the module docstring."""
    if spec == "fashion_mnist":
        source = dict(name="fashion_mnist", data_dir=data_dir or FASHION_MNIST_DIR)
        source["split"] = split or "test"
        return EvalDataset(
            spec, source, list(FASHION_MNIST_CLASSNAMES), clip_templates(), crop=False
        )
    if spec.startswith("folder:") or spec == "image_folder":
        root = spec.partition(":")[2] if spec.startswith("folder:") else data_dir
        if not root:
            raise ValueError("--dataset image_folder needs --data_dir (or use folder:DIR)")
        if split:
            raise ValueError("an image folder has no splits; point it at the folder to read")
        # The source's own listing: its label order is the order of these names.
        names = [readable_label(name) for name in list_image_folder(root)[0]]
        source = dict(name="image_folder", root=root, classnames=None)
        return EvalDataset(f"folder:{root}", source, names, clip_templates())
    if spec.startswith("tfrecord:"):
        raise ValueError("TFRecord caption shards have no labels; use them with --retrieval")
    name = spec.partition(":")[2] if spec.startswith("tfds:") else spec
    if name in TFDS_ALIASES:
        name, default_split = TFDS_ALIASES[name]
        split = split or default_split
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: build it first "
            "(see the README: ImageNet) and pass its data_dir"
        )
    split = split or _first_split(builder, name)
    features = builder.info.features
    label = features["label"] if "label" in features else None
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"TFDS dataset {name!r} has no ClassLabel feature 'label'")
    classnames, templates = tfds_classnames_and_templates(name, list(label.names))
    source = dict(name="tfds", dataset=name, data_dir=data_dir, split=split, label_key="label")
    return EvalDataset(f"{name} ({split})", source, classnames, templates)


def caption_dataset(
    spec: str, data_dir: str | None = None, split: str | None = None
) -> EvalDataset:
    """An image-caption dataset for retrieval: "fashion_mnist" or "tfrecord:GLOB"."""
    if spec == "fashion_mnist":
        source = dict(
            name="fashion_mnist", data_dir=data_dir or FASHION_MNIST_DIR, split=split or "test"
        )
        return EvalDataset(f"fashion_mnist ({source['split']}) captions", source, crop=False)
    if spec.startswith("tfrecord:"):
        if split:
            raise ValueError("TFRecord shards have no splits: give the glob of the shards to read")
        return EvalDataset(spec, dict(name="tfrecord", files=spec.partition(":")[2]))
    raise ValueError(f"retrieval reads 'fashion_mnist' or 'tfrecord:GLOB', got {spec!r}")


def _first_split(builder: Any, name: str) -> str:
    splits = builder.info.splits
    for split in DEFAULT_SPLITS:
        if split in splits:
            return split
    raise ValueError(f"TFDS dataset {name!r} has none of the splits {DEFAULT_SPLITS}; give --split")
