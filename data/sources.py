"""Data sources by name: "tfds", "tfrecord", "fashion_mnist" (config.input.source.name).

`make_source(name, **options)` checks the options against the source's constructor signature and
type hints (unknown or mistyped options fail naming them), then builds it. To add a source,
subclass data.source_base.Source and register it in SOURCES below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from data.captions import CaptionBank, forbidden_captions, generic_class_captions
from data.fashion_mnist import FashionMnistSource
from data.registry import Registry
from data.source_base import Source, check_process
from data.tfrecords import TFRecordSource
from data.zeroshot_texts import clip_templates, imagenet_classnames


class TfdsSource(Source):
    """A prepared TFDS dataset with an image feature and a text and/or class-label feature.

    Reads from `data_dir` only (never downloads). Encoded images are kept as bytes
    (SkipDecoding) so the `decode` op decodes them and corrupt ones are counted, not fatal.
    Per process, the split is cut with tfds.even_splits, which reads only the needed shards.

    Args:
      dataset: TFDS name, optionally with config/version ("my_pairs:1.0.0").
      data_dir: where the prepared dataset lives (TFDS default directory when None).
      split: TFDS split expression ("train", "train[:90%]").
      image_key: image feature name.
      text_key: caption feature; None for label-only datasets, which then get captions built
        from the class names.
      label_key: class-label feature, also passed through as "label".
      classnames: names to build captions from, overriding the ClassLabel names (which for some
        datasets are ids such as WordNet synsets).
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str | None = None,
        split: str = "train",
        image_key: str = "image",
        text_key: str | None = None,
        label_key: str | None = None,
        classnames: Sequence[str] | None = None,
    ) -> None:
        if text_key is None and label_key is None:
            raise ValueError("tfds source needs text_key or label_key (or both)")
        self.builder = tfds.builder(dataset, data_dir=data_dir)
        features = self.builder.info.features
        for key in (image_key, text_key, label_key):
            if key is not None and key not in features:
                raise ValueError(
                    f"tfds dataset {dataset!r} has no feature {key!r}; features: {list(features)}"
                )
        self.dataset, self.split = dataset, split
        self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
        self._skip_image_decoding = isinstance(features[image_key], tfds.features.Image)
        if text_key is None:
            names = list(classnames) if classnames is not None else self._label_names(features)
            forbidden = forbidden_captions({*names, *imagenet_classnames()}, clip_templates())
            self.captions = CaptionBank(generic_class_captions(names, forbidden))

    def _label_names(self, features: Any) -> list[str]:
        label = features[self.label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(f"feature {self.label_key!r} is not a ClassLabel; pass classnames")
        return list(label.names)

    def num_examples(self) -> int:
        return self.builder.info.splits[self.split].num_examples

    def records(self, process_index: int, process_count: int, seed: int) -> tf.data.Dataset:
        check_process(process_index, process_count)
        split = self.split
        if process_count > 1:
            split = tfds.even_splits(self.split, n=process_count)[process_index]
        read_config = tfds.ReadConfig(
            shuffle_seed=seed,
            shuffle_reshuffle_each_iteration=True,
            # A cache would silently hold the whole split in memory for small datasets.
            try_autocache=False,
        )
        decoders = None
        if self._skip_image_decoding:
            decoders = {self.image_key: tfds.decode.SkipDecoding()}
        ds = self.builder.as_dataset(
            split=split, shuffle_files=True, decoders=decoders, read_config=read_config
        )
        return ds.map(self._to_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _to_record(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        record = {"image": example[self.image_key]}
        if self.text_key is not None:
            record["text"] = example[self.text_key]
        if self.label_key is not None:
            record["label"] = tf.cast(example[self.label_key], tf.int32)
        return record

    def describe(self) -> str:
        return f"tfds({self.dataset}, {self.split}, from {self.builder.data_dir})"


SOURCES = Registry("data source")
SOURCES.register("tfds")(TfdsSource)
SOURCES.register("tfrecord")(TFRecordSource)
SOURCES.register("fashion_mnist")(FashionMnistSource)


def make_source(name: str, **options: Any) -> Source:
    """Builds the source registered as `name`; unknown names and options fail naming them."""
    return SOURCES.build(name, **options)
