"""Fashion-MNIST from its IDX files, with captions built by this project.

The Debian package dataset-fashion-mnist installs the four gzip IDX files in
/usr/share/datasets/fashion-mnist/:
  train-images-idx3-ubyte.gz  uint8 [60000, 28, 28]     train-labels-idx1-ubyte.gz  uint8 [60000]
  t10k-images-idx3-ubyte.gz   uint8 [10000, 28, 28]     t10k-labels-idx1-ubyte.gz   uint8 [10000]
Uncompressed files (same names without .gz) are read too.

The files are read through tf.io.gfile (data_dir may be remote, e.g. gs://) into memory. Each
example is a shard of its own: every epoch is a full permutation of the split, and processes share
it by example, so the global batches are the same for any process count (data/order.py).

Images come out as uint8 [28, 28, 1] (grey); the op string turns them into RGB at the configured
size ("decode|resize(32)|..." or "grey_to_rgb|resize(32)|..."). Captions come from templates x
synonyms x attributes (optionally plus CuPL sentences of related ImageNet classes), never equal to
a CLIP zero-shot prompt.

Optional input-dependent label noise (`label_noise_confusable`, `label_noise_other`): some
examples carry a wrong label, and so a caption naming the wrong class, more often than others.
With C = {T-shirt/top, Pullover, Coat, Shirt} (the upper-body garments, which look alike at 28 px)
and y the clean label of example i:
  flip probability  p(y) = label_noise_confusable if y in C, else label_noise_other
  wrong label       uniform over C minus {y} if y in C, else uniform over the 9 other classes
so the noisy label equals y with probability 1 - p(y) and each wrong class with p(y) / |choices|.
Both draws for example i are a pure function of (label_noise_seed, i): the noise is a fixed
property of the dataset for a seed (every epoch sees the same wrong labels) and replays exactly.
Labels are replaced before anything else reads them, so classification trains on the noisy label
and the contrastive pipeline draws the caption of the noisy class.
"""

from __future__ import annotations

import functools
import gzip
import json
import posixpath

import numpy as np

from data.captions import CaptionBank, Noun, build_class_captions, forbidden_captions
from data.lazy_tf import tf
from data.package_files import clip_benchmark_file
from data.source_base import ShardTable, Source
from data.zeroshot_texts import FASHION_MNIST_CLASSNAMES, clip_templates, imagenet_classnames

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

# split -> (images file stem, labels file stem)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# The dataset's own label strings, in label order.
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Label indices of the classes that look alike (T-shirt/top, Pullover, Coat, Shirt).
CONFUSABLE_CLASSES = (0, 2, 4, 6)

# Keeps the label-noise draws apart from any other use of the same seed.
LABEL_NOISE_TAG = 0x1AB3_1F11

# IDX type byte -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into an array of its declared shape.

    Raises ValueError naming the file when the magic number is wrong or the payload is shorter or
    longer than the header declares (a truncated download must not turn into silent garbage).
    """
    path = str(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(data_dir: str, stem: str) -> str:
    """`stem` or `stem.gz` inside data_dir; FileNotFoundError lists what was looked for."""
    for name in (f"{stem}.gz", stem):
        path = posixpath.join(str(data_dir), name)
        if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
            return path
    raise FileNotFoundError(
        f"no {stem}[.gz] in {data_dir} (install dataset-fashion-mnist or point data_dir at the "
        "IDX files)"
    )


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28, 1] images, int32 [N] labels) of "train" or "test"."""
    if split not in SPLIT_FILES:
        raise ValueError(f"Fashion-MNIST split {split!r}; known: {sorted(SPLIT_FILES)}")
    images_stem, labels_stem = SPLIT_FILES[split]
    images = read_idx(find_idx_file(data_dir, images_stem))
    labels = read_idx(find_idx_file(data_dir, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} in {data_dir}: images {images.shape} and labels "
            f"{labels.shape} do not pair up"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(LABEL_NAMES)):
        raise ValueError(f"Fashion-MNIST {split}: labels outside 0..{len(LABEL_NAMES) - 1}")
    return images.astype(np.uint8)[..., None], labels.astype(np.int32)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64, elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _example_uniforms(seed: int, count: int, stream: int) -> np.ndarray:
    """float64 [count] in [0, 1): uniform number `stream` of examples 0..count-1 for `seed`,
    each a function of (seed, stream, example index) alone."""
    key = _mix64(np.asarray([seed ^ LABEL_NOISE_TAG], np.uint64))[0]
    key = _mix64(np.asarray([key ^ np.uint64(stream)], np.uint64))[0]
    with np.errstate(over="ignore"):
        bits = _mix64(key + np.arange(count, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def label_flip_probabilities(labels: np.ndarray, confusable: float, other: float) -> np.ndarray:
    """float64 [N]: the probability p(y) that each example's label is replaced (module doc)."""
    return np.where(np.isin(labels, CONFUSABLE_CLASSES), confusable, other)


def noisy_labels(labels: np.ndarray, confusable: float, other: float, seed: int) -> np.ndarray:
    """int32 [N] labels with input-dependent noise (module doc): example i is flipped when its
    first uniform falls below p(y_i), to the wrong class its second uniform picks."""
    for name, value in (("label_noise_confusable", confusable), ("label_noise_other", other)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {value}")
    labels = np.asarray(labels, np.int32)
    flip = _example_uniforms(seed, len(labels), 0) < label_flip_probabilities(
        labels, confusable, other
    )
    pick = _example_uniforms(seed, len(labels), 1)
    result = labels.copy()
    all_classes = np.arange(len(LABEL_NAMES))
    for label in np.unique(labels[flip]):
        group = CONFUSABLE_CLASSES if label in CONFUSABLE_CLASSES else all_classes
        choices = np.asarray([c for c in group if c != label], np.int32)
        rows = flip & (labels == label)
        result[rows] = choices[(pick[rows] * len(choices)).astype(np.int64)]
    return result


# Ways to name each class in a training caption (label order).
CAPTION_NOUNS: tuple[tuple[Noun, ...], ...] = (
    (Noun("T-shirt"), Noun("top"), Noun("tee"), Noun("short-sleeved top")),
    (
        Noun("pair of trousers"),
        Noun("trousers", countable=False),
        Noun("pants", countable=False),
        Noun("pair of slacks"),
    ),
    (Noun("pullover"), Noun("sweater"), Noun("jumper"), Noun("knitted sweater")),
    (Noun("dress"), Noun("frock"), Noun("summer dress"), Noun("one-piece dress")),
    (Noun("coat"), Noun("jacket"), Noun("overcoat"), Noun("winter coat")),
    (Noun("sandal"), Noun("open-toe shoe"), Noun("summer sandal"), Noun("strappy sandal")),
    (Noun("shirt"), Noun("button-up shirt"), Noun("blouse"), Noun("collared shirt")),
    (Noun("sneaker"), Noun("trainer"), Noun("running shoe"), Noun("canvas shoe")),
    (Noun("bag"), Noun("handbag"), Noun("purse"), Noun("tote bag")),
    (Noun("ankle boot"), Noun("boot"), Noun("short boot"), Noun("bootie")),
)

# Clothing attributes; adjectives of the CLIP prompts (clean, dirty, large, small, cool, nice,
# weird, hard to see) are avoided so that captions stay structurally unlike the prompts.
CAPTION_ATTRIBUTES = (
    "",
    "black",
    "white",
    "grey",
    "dark",
    "light-coloured",
    "plain",
    "patterned",
    "striped",
    "casual",
)

# "{x}" is a noun phrase with its article ("a black pullover", "pants").
CAPTION_TEMPLATES = (
    "a photo of {x}",
    "a product shot of {x}",
    "a catalogue photo of {x}",
    "a greyscale image of {x}",
    "{x} on a plain background",
    "an online shop picture of {x}",
    "a small thumbnail of {x}",
    "a studio picture of {x}",
    "{x}, photographed from the front",
    "a low-resolution product photo of {x}",
    "a fashion item: {x}",
    "this is {x}",
)

# CuPL describes ImageNet classes; these are the ones close to a Fashion-MNIST class.
CUPL_CLASSES = (
    ("T-shirt",),
    ("jeans",),
    ("sweatshirt", "cardigan"),
    ("gown",),
    ("trench coat", "fur coat"),
    ("sandal",),
    (),
    ("sneaker",),
    ("purse", "messenger bag"),
    ("cowboy boot",),
)


def cupl_sentences() -> list[list[str]]:
    """[10][n] CuPL sentences for the ImageNet classes related to each Fashion-MNIST class."""
    with open(clip_benchmark_file("cupl_prompts.json"), encoding="utf-8") as f:
        prompts = json.load(f)["imagenet1k"]
    return [[s for name in names for s in prompts[name]] for names in CUPL_CLASSES]


@functools.lru_cache(maxsize=2)
def fashion_mnist_captions(cupl: bool = False) -> tuple[tuple[str, ...], ...]:
    """[10][n] training captions per class, none equal to a CLIP prompt for any class name
    (Fashion-MNIST and ImageNet zero-shot names and the caption synonyms)."""
    names = {*FASHION_MNIST_CLASSNAMES, *imagenet_classnames(), *LABEL_NAMES}
    names |= {noun.text for nouns in CAPTION_NOUNS for noun in nouns}
    forbidden = forbidden_captions(names, clip_templates())
    captions = build_class_captions(
        CAPTION_NOUNS,
        CAPTION_TEMPLATES,
        CAPTION_ATTRIBUTES,
        forbidden,
        sentences_per_class=cupl_sentences() if cupl else None,
    )
    return tuple(tuple(c) for c in captions)


class FashionMnistSource(Source):
    """Fashion-MNIST read from IDX files; records {"image": uint8 [28, 28, 1], "label": int32 []}
    with captions drawn from fashion_mnist_captions().

    Args:
      data_dir: directory of the IDX files (gz or not).
      split: "train" (60,000 images) or "test" (10,000).
      cupl: add CuPL sentences of related ImageNet classes to the captions.
      label_noise_confusable: probability that an example of CONFUSABLE_CLASSES gets the label
        (and caption) of another confusable class.
      label_noise_other: probability that an example of any other class gets the label of one of
        the 9 other classes.
      label_noise_seed: which examples are flipped, and to what (module doc).

    Attributes:
      labels: int32 [N] labels the records carry (noisy when label noise is on).
      clean_labels: int32 [N] the labels of the IDX file.
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        split: str = "train",
        cupl: bool = False,
        label_noise_confusable: float = 0.0,
        label_noise_other: float = 0.0,
        label_noise_seed: int = 0,
    ) -> None:
        self.data_dir = data_dir
        self.split = split
        # Loaded now so a missing or truncated file fails at construction, before training.
        self.images, self.clean_labels = load_split(data_dir, split)
        self.labels = self.clean_labels
        self.label_noise = (label_noise_confusable, label_noise_other)
        if label_noise_confusable or label_noise_other:
            self.labels = noisy_labels(
                self.clean_labels, label_noise_confusable, label_noise_other, label_noise_seed
            )
        # Eager tensors, made once: read() runs inside a traced tf.data function, where a numpy
        # array would become a graph constant, copied (47 MB for the training split) every time
        # an iterator is made: seconds per epoch of evaluation or restart, instead of none.
        self._image_table = tf.constant(self.images)
        self._label_table = tf.constant(self.labels)
        self.captions = CaptionBank(fashion_mnist_captions(cupl))
        # One example per shard, all in one group: an epoch is a full permutation of the split.
        self.example_sharded = True
        self.group_size = len(self.labels)

    def shards(self) -> ShardTable:
        return {"index": np.arange(len(self.labels), dtype=np.int64)}

    def read(self, shards: dict[str, tf.Tensor]) -> tf.data.Dataset:
        """The examples at the given indices, in that order."""
        index = shards["index"]
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": tf.gather(self._image_table, index),
                "label": tf.gather(self._label_table, index),
            }
        )

    def num_examples(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        noise = ""
        if any(self.label_noise):
            flipped = float(np.mean(self.labels != self.clean_labels))
            noise = (
                f", label noise {self.label_noise[0]:g} confusable / {self.label_noise[1]:g} "
                f"other: {flipped:.1%} flipped"
            )
        return f"fashion_mnist({self.split}, {len(self.labels)} images from {self.data_dir}{noise})"
