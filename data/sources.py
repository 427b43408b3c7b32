"""Data sources by name: "tfds", "tfrecord", "fashion_mnist", "image_folder"
(config.input.source.name).

`make_source(name, **options)` checks the options against the source's constructor signature and
type hints (unknown or mistyped options fail naming them), then builds it. To add a source,
subclass data.source_base.Source and register it in SOURCES below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data.captions import CaptionBank, forbidden_captions, generic_class_captions
from data.fashion_mnist import FashionMnistSource
from data.image_folder import ImageFolderSource
from data.lazy_tf import tf, tfds
from data.registry import Registry
from data.source_base import ShardTable, Source
from data.tfrecords import TFRecordSource
from data.zeroshot_texts import clip_templates, imagenet_classnames


class TfdsSource(Source):
    """A prepared TFDS dataset with an image feature and a text and/or class-label feature.

    Reads from `data_dir` only (never downloads). Encoded images are kept as bytes
    (SkipDecoding) so the `decode` op decodes them and corrupt ones are counted, not fatal.
    The shards are the split's file instructions (TFRecord file, records to skip, records to
    take), read `cycle_length` at a time; processes get whole shards when there are at least as
    many as processes, and share the records otherwise (data/source_base.assign_shards). Features
    must have fixed shapes (true of encoded images, texts and labels).

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
      cycle_length: shards read concurrently (interleaved record by record); a resume re-reads
        at most this many.
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
        cycle_length: int = 16,
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
        self._decoders = None
        if isinstance(features[image_key], tfds.features.Image):
            self._decoders = {image_key: tfds.decode.SkipDecoding()}
        self.group_size = cycle_length
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

    def shards(self) -> ShardTable:
        if not self.builder.is_prepared():
            raise ValueError(
                f"tfds dataset {self.dataset!r} is not prepared in {self.builder.data_dir} "
                "(this source never downloads: prepare it there first)"
            )
        file_format = str(self.builder.info.file_format)
        if "tfrecord" not in file_format.lower():
            raise ValueError(
                f"tfds dataset {self.dataset!r} is stored as {file_format}, not TFRecord"
            )
        instructions = self.builder.info.splits[self.split].file_instructions
        return {
            "file": np.asarray([i.filename for i in instructions]),
            "skip": np.asarray([i.skip for i in instructions], np.int64),
            # take < 0 (all records from `skip` on) is what Dataset.take reads as "all".
            "take": np.asarray([i.take for i in instructions], np.int64),
        }

    def read(self, shards: dict[str, tf.Tensor]) -> tf.data.Dataset:
        """Records of the file ranges, one from each range in turn, deserialized."""
        ds = tf.data.Dataset.from_tensor_slices(shards).interleave(
            lambda shard: (
                tf.data.TFRecordDataset(shard["file"]).skip(shard["skip"]).take(shard["take"])
            ),
            cycle_length=self.group_size,
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.map(self._deserialize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _deserialize(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        features = self.builder.info.features
        return self._to_record(features.deserialize_example(serialized, decoders=self._decoders))

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
SOURCES.register("image_folder")(ImageFolderSource)


def make_source(name: str, **options: Any) -> Source:
    """Builds the source registered as `name`; unknown names and options fail naming them."""
    return SOURCES.build(name, **options)
