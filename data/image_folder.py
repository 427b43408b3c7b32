"""Images in a folder with one sub-folder per class, as label-only records with class captions.

    root/
      n01440764/  a.JPEG  b.JPEG ...      (ImageNet's train/ layout, or any class names)
      n01443537/  ...

Class indices follow the sorted sub-folder names. Each image file is a shard of its own, and
only its name travels through the shuffle: the bytes are read with tf.io.read_file in `parse`,
in parallel, so a missing or corrupt file counts as an undecodable record. Processes share the
files by example (every epoch a full permutation of them; data/order.py). Listing and reading go
through tf.io.gfile, so `root` may be remote (gs://...).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import numpy as np

from data.captions import CaptionBank, forbidden_captions, generic_class_captions
from data.lazy_tf import tf
from data.source_base import ShardTable, Source
from data.zeroshot_texts import clip_templates, imagenet_classnames

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def list_image_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    """(class folder names sorted, image paths, class index of each path) under `root`.

    Files directly inside each class folder with an image extension (case-insensitive) count;
    deeper files and other files are ignored. Empty class folders still take a class index.
    """
    root = root.rstrip("/")
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    # One glob lists every file (a single listing on object stores); listdir adds empty class
    # folders, which object stores and in-memory file systems may not show as entries at all.
    files = [
        path
        for path in tf.io.gfile.glob(posixpath.join(root, "*", "*"))
        if path.lower().endswith(IMAGE_EXTENSIONS)
    ]
    folders = {
        name.rstrip("/")
        for name in tf.io.gfile.listdir(root)
        if tf.io.gfile.isdir(posixpath.join(root, name))
    }
    classes = sorted(folders | {posixpath.basename(posixpath.dirname(path)) for path in files})
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {root}"
        )
    index = {name: label for label, name in enumerate(classes)}
    files.sort(key=lambda path: (index[posixpath.basename(posixpath.dirname(path))], path))
    labels = [index[posixpath.basename(posixpath.dirname(path))] for path in files]
    return classes, files, labels


class ImageFolderSource(Source):
    """Records {"image": encoded bytes, "label": int32 class index} from a class-per-folder tree,
    with captions drawn from the class names.

    Args:
      root: the folder holding one sub-folder per class (local or remote path).
      classnames: names to build captions from, one per sub-folder in sorted order (default: the
        folder names; pass readable names when folders are ids such as WordNet synsets).
    """

    def __init__(self, root: str, classnames: Sequence[str] | None = None) -> None:
        self.root = root
        self.classes, paths, labels = list_image_folder(root)
        names = list(classnames) if classnames is not None else self.classes
        if len(names) != len(self.classes):
            raise ValueError(
                f"{len(names)} classnames for {len(self.classes)} class folders in {root}"
            )
        self.paths = np.asarray(paths)
        self.labels = np.asarray(labels, np.int32)
        forbidden = forbidden_captions({*names, *imagenet_classnames()}, clip_templates())
        self.captions = CaptionBank(generic_class_captions(names, forbidden))
        # One file per shard, all in one group: an epoch is a full permutation of the files.
        self.example_sharded = True
        self.group_size = len(paths)

    def shards(self) -> ShardTable:
        return {"path": self.paths, "label": self.labels}

    def read(self, shards: dict[str, tf.Tensor]) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(shards)

    def parse(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": tf.io.read_file(element["path"]), "label": element["label"]}

    def num_examples(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        return f"image_folder({self.root}, {len(self.paths)} images in {len(self.classes)} classes)"
