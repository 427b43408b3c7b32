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

Optional label noise on the training split (data/label_noise.py has the formulas):
`label_noise_model="class"` flips labels with a probability set by the class alone
(`label_noise_confusable`, `label_noise_other`); `label_noise_model="image"` flips them with a
probability that depends on the individual image, through a weak fixed image model's confusion,
at an average rate `label_noise_rate`. Labels are replaced before anything else reads them, so
classification trains on the noisy label and the contrastive pipeline draws the caption of the
noisy class; the source keeps the clean labels and each example's flip probability (the ledger
`scripts.score_pairs` scores against).
"""

from __future__ import annotations

import functools
import gzip
import json
import posixpath

import numpy as np

from data import label_noise
from data.captions import CaptionBank, Noun, build_class_captions, forbidden_captions
from data.lazy_tf import tf
from data.package_files import clip_benchmark_file
from data.source_base import ShardTable, Source
from data.zeroshot_texts import FASHION_MNIST_CLASSNAMES, clip_templates, imagenet_classnames

# The class-conditional model, under the names it has always been imported by.
CONFUSABLE_CLASSES = label_noise.CONFUSABLE_CLASSES
noisy_labels = label_noise.noisy_labels

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


def _check_label_noise(model: str, confusable: float, other: float, rate: float) -> tuple:
    """The noise model's own parameters; a parameter of the other model set is refused, so a
    run never silently ignores one."""
    if model == "class":
        if rate:
            raise ValueError(
                f"label_noise_rate={rate:g} belongs to label_noise_model='image'; the 'class' "
                "model takes label_noise_confusable and label_noise_other"
            )
        return (confusable, other)
    if model == "image":
        if confusable or other:
            raise ValueError(
                "label_noise_confusable / label_noise_other belong to label_noise_model="
                "'class'; the 'image' model takes label_noise_rate"
            )
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"label_noise_rate is a probability in [0, 1], got {rate}")
        return (rate,)
    raise ValueError(
        f"label_noise_model {model!r} is unknown; known: {list(label_noise.NOISE_MODELS)}"
    )


class FashionMnistSource(Source):
    """Fashion-MNIST read from IDX files; records {"image": uint8 [28, 28, 1], "label": int32 []}
    with captions drawn from fashion_mnist_captions().

    Args:
      data_dir: directory of the IDX files (gz or not).
      split: "train" (60,000 images) or "test" (10,000).
      cupl: add CuPL sentences of related ImageNet classes to the captions.
      label_noise_model: "class" (flip probability set by the class) or "image" (set by the
        image, through a weak image model's confusion): data/label_noise.py.
      label_noise_confusable: ("class") probability that an example of CONFUSABLE_CLASSES gets
        the label (and caption) of another confusable class.
      label_noise_other: ("class") probability that an example of any other class gets the
        label of one of the 9 other classes.
      label_noise_rate: ("image") the average flip probability over the split's images.
      label_noise_seed: which examples are flipped, and to what.

    Attributes:
      labels: int32 [N] labels the records carry (noisy when label noise is on).
      clean_labels: int32 [N] the labels of the IDX file.
      flip_probabilities: float64 [N] each example's probability of carrying a wrong label
        (zeros without label noise).
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        split: str = "train",
        cupl: bool = False,
        label_noise_confusable: float = 0.0,
        label_noise_other: float = 0.0,
        label_noise_seed: int = 0,
        label_noise_model: str = "class",
        label_noise_rate: float = 0.0,
    ) -> None:
        self.data_dir = data_dir
        self.split = split
        self.label_noise_model = label_noise_model
        self.label_noise = _check_label_noise(
            label_noise_model, label_noise_confusable, label_noise_other, label_noise_rate
        )
        # Loaded now so a missing or truncated file fails at construction, before training.
        self.images, self.clean_labels = load_split(data_dir, split)
        self.labels = self.clean_labels
        self.flip_probabilities = np.zeros(len(self.labels))
        if any(self.label_noise):
            if label_noise_model == "class":
                flip, wrong = label_noise.class_noise(self.clean_labels, *self.label_noise)
            else:
                # Fitted on the training split's clean labels, whatever split this is.
                train = (self.images, self.clean_labels)
                if split != "train":
                    train = load_split(data_dir, "train")
                weak = label_noise.weak_model_probabilities(
                    label_noise.weak_model_of(*train), self.images
                )
                flip, wrong = label_noise.image_noise(weak, self.clean_labels, label_noise_rate)
            self.flip_probabilities = flip
            self.labels = label_noise.draw_noisy_labels(
                self.clean_labels, flip, wrong, label_noise_seed
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
            if self.label_noise_model == "class":
                noise = f"{self.label_noise[0]:g} confusable / {self.label_noise[1]:g} other"
            else:
                spread = self.flip_probabilities.std()
                noise = f"by image, rate {self.label_noise[0]:g} (std {spread:.3f} over images)"
            noise = f", label noise {noise}: {flipped:.1%} flipped"
        return f"fashion_mnist({self.split}, {len(self.labels)} images from {self.data_dir}{noise})"
