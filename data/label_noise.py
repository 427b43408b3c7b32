"""Label noise for the Fashion-MNIST training split: which examples carry a wrong label, and which.

Two models, chosen by the source's `label_noise_model`. In both, y_i is the clean label of
example i, and the two uniforms u_i, v_i that decide its fate are a pure function of
(label_noise_seed, i): the noise is a fixed property of the dataset for a seed (every epoch sees
the same wrong labels, every arm of an experiment the same ones for a seed) and replays exactly.

"class" (class-conditional; label_noise_confusable, label_noise_other). With C = {T-shirt/top,
Pullover, Coat, Shirt}, the upper-body garments that look alike at 28 px:
  flip probability  q_i = label_noise_confusable if y_i in C, else label_noise_other
  wrong label       uniform over C minus {y_i} if y_i in C, else uniform over the 9 other classes
Every image of a class is flipped with the same probability: a deterministic classifier can fit
the noisy label distribution from the class alone.

"image" (image-conditional; label_noise_rate). A weak, fixed image model, a softmax regression
on 7x7 average-pooled pixels trained on the training split's clean labels (WEAK_MODEL_*; the
test split is never read), gives each training image class probabilities w_i. Its confusion
c_i = 1 - w_i[y_i] says how much image i looks like another class, and
  flip probability  q_i = min(1, a * c_i), a chosen so that mean_i q_i = label_noise_rate
  wrong label       k != y_i with probability w_i[k] / c_i
so an ambiguous shirt is mislabelled far more often than a clear one, and as the class it looks
like. The rate varies within every class (`noise_report` says by how much).

Example i is flipped when u_i < q_i, to the wrong class that v_i picks from the cumulative
distribution of the wrong classes.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

NUM_CLASSES = 10

# Label indices of the classes that look alike (T-shirt/top, Pullover, Coat, Shirt).
CONFUSABLE_CLASSES = (0, 2, 4, 6)

NOISE_MODELS = ("class", "image")

# Keeps the label-noise draws apart from any other use of the same seed.
LABEL_NOISE_TAG = 0x1AB3_1F11

# The weak image model: average pooling of the 28x28 images to 7x7, standardised features, a
# softmax regression from zero weights trained by full-batch gradient descent with Nesterov
# momentum for a fixed number of steps. Zero start and a fixed schedule make it deterministic
# (no seed to choose); 7x7 pixels make it weak (about 0.8 training accuracy against the towers'
# 0.9), so that its mistakes are the look-alikes a human labeller would also confuse.
WEAK_MODEL_POOL = 4
WEAK_MODEL_STEPS = 150
WEAK_MODEL_LEARNING_RATE = 1.0
WEAK_MODEL_MOMENTUM = 0.9
WEAK_MODEL_L2 = 1e-4


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64, elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def example_uniforms(seed: int, count: int, stream: int) -> np.ndarray:
    """float64 [count] in [0, 1): uniform number `stream` of examples 0..count-1 for `seed`,
    each a function of (seed, stream, example index) alone."""
    key = _mix64(np.asarray([seed ^ LABEL_NOISE_TAG], np.uint64))[0]
    key = _mix64(np.asarray([key ^ np.uint64(stream)], np.uint64))[0]
    with np.errstate(over="ignore"):
        bits = _mix64(key + np.arange(count, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability in [0, 1], got {value}")


def class_noise(labels: np.ndarray, confusable: float, other: float) -> tuple:
    """(q [N], wrong-class distributions [N, 10]) of the "class" model (module doc)."""
    for name, value in (("label_noise_confusable", confusable), ("label_noise_other", other)):
        _check_probability(name, value)
    labels = np.asarray(labels, np.int64)
    in_group = np.isin(labels, CONFUSABLE_CLASSES)
    flip = np.where(in_group, confusable, other)
    confusable_row = np.isin(np.arange(NUM_CLASSES), CONFUSABLE_CLASSES)
    allowed = np.where(in_group[:, None], confusable_row[None, :], True)
    allowed[np.arange(len(labels)), labels] = False
    return flip, allowed / allowed.sum(axis=1, keepdims=True)


def pooled_features(images: np.ndarray) -> np.ndarray:
    """float64 [N, 49]: uint8 [N, 28, 28(, 1)] images averaged over 4x4 blocks, in [0, 1]."""
    images = np.asarray(images).reshape(len(images), 28, 28).astype(np.float64) / 255.0
    size = 28 // WEAK_MODEL_POOL
    blocks = images.reshape(len(images), size, WEAK_MODEL_POOL, size, WEAK_MODEL_POOL)
    return blocks.mean(axis=(2, 4)).reshape(len(images), -1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _standardised_with_bias(features: np.ndarray, mean: np.ndarray, std: np.ndarray):
    return np.concatenate([(features - mean) / std, np.ones((len(features), 1))], axis=1)


def fit_weak_model(images: np.ndarray, labels: np.ndarray) -> tuple:
    """The weak image model (module doc) trained on (images, labels): (feature mean [49],
    feature std [49], weights [50, 10])."""
    features = pooled_features(images)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    features = _standardised_with_bias(features, mean, std)
    targets = np.eye(NUM_CLASSES)[np.asarray(labels, np.int64)]
    weights = np.zeros((features.shape[1], NUM_CLASSES))
    velocity = np.zeros_like(weights)
    for _ in range(WEAK_MODEL_STEPS):
        ahead = weights + WEAK_MODEL_MOMENTUM * velocity
        gradient = features.T @ (_softmax(features @ ahead) - targets) / len(features)
        gradient += WEAK_MODEL_L2 * ahead
        velocity = WEAK_MODEL_MOMENTUM * velocity - WEAK_MODEL_LEARNING_RATE * gradient
        weights = weights + velocity
    return mean, std, weights


def weak_model_probabilities(model: tuple, images: np.ndarray) -> np.ndarray:
    """float64 [N, 10]: class probabilities of a fit_weak_model model for the images."""
    mean, std, weights = model
    return _softmax(_standardised_with_bias(pooled_features(images), mean, std) @ weights)


@functools.lru_cache(maxsize=2)
def _cached_weak_model(digest: str, images: bytes, labels: bytes) -> tuple:
    del digest  # the cache key only
    return fit_weak_model(
        np.frombuffer(images, np.uint8).reshape(-1, 28, 28), np.frombuffer(labels, np.int32)
    )


def weak_model_of(train_images: np.ndarray, train_labels: np.ndarray) -> tuple:
    """fit_weak_model of a training split, fitted once per process for the same data (a run
    builds its training source more than once: checks, then the pipeline of every process)."""
    images = np.ascontiguousarray(train_images, np.uint8).tobytes()
    labels = np.ascontiguousarray(train_labels, np.int32).tobytes()
    digest = hashlib.sha256(images + labels).hexdigest()
    return _cached_weak_model(digest, images, labels)


def rate_scale(confusion: np.ndarray, rate: float) -> float:
    """a >= 0 with mean(min(1, a * confusion)) = rate, by bisection (the mean is continuous and
    non-decreasing in a). Raises when the rate cannot be reached."""
    _check_probability("label_noise_rate", rate)
    reachable = float(np.mean(confusion > 0))
    if rate > reachable:
        raise ValueError(
            f"label_noise_rate {rate} exceeds {reachable:.4f}, the share of images the weak "
            "model confuses at all"
        )
    if rate == 0:
        return 0.0
    low, high = 0.0, 1.0
    while np.mean(np.minimum(1.0, high * confusion)) < rate:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2
        if np.mean(np.minimum(1.0, middle * confusion)) < rate:
            low = middle
        else:
            high = middle
    return high


def image_noise(probabilities: np.ndarray, labels: np.ndarray, rate: float) -> tuple:
    """(q [N], wrong-class distributions [N, 10]) of the "image" model from the weak model's
    probabilities w [N, 10] (module doc)."""
    labels = np.asarray(labels, np.int64)
    wrong = np.array(probabilities, np.float64)
    wrong[np.arange(len(labels)), labels] = 0.0
    confusion = wrong.sum(axis=1)
    flip = np.minimum(1.0, rate_scale(confusion, rate) * confusion)
    # An image the weak model is certain of (confusion 0) is never flipped; its row is unused.
    safe = np.where(confusion > 0, confusion, 1.0)
    return flip, wrong / safe[:, None]


def draw_noisy_labels(
    labels: np.ndarray, flip: np.ndarray, wrong: np.ndarray, seed: int
) -> np.ndarray:
    """int32 [N]: labels with example i replaced when u_i < flip[i], by the wrong class v_i
    picks from the distribution wrong[i] (module doc)."""
    labels = np.asarray(labels, np.int32)
    flipped = example_uniforms(seed, len(labels), 0) < flip
    pick = example_uniforms(seed, len(labels), 1)
    cumulative = np.cumsum(wrong, axis=1)
    # The first class whose cumulative share exceeds v; the last class with a share catches
    # float round-off at the top of the cumulative sum.
    choice = np.argmax(cumulative > (pick * cumulative[:, -1])[:, None], axis=1)
    return np.where(flipped, choice, labels).astype(np.int32)


def noisy_labels(labels: np.ndarray, confusable: float, other: float, seed: int) -> np.ndarray:
    """int32 [N]: labels with the "class" model's noise (module doc)."""
    flip, wrong = class_noise(labels, confusable, other)
    return draw_noisy_labels(labels, flip, wrong, seed)


def noise_report(
    clean: np.ndarray, noisy: np.ndarray, flip: np.ndarray, names: tuple[str, ...]
) -> dict:
    """Per class and overall: the mean flip probability, its spread over the class's images (std
    and 10th / 50th / 90th percentiles: all equal under the "class" model) and the share of
    examples actually flipped. JSON-ready."""

    def summary(rows: np.ndarray) -> dict:
        values = flip[rows]
        low, middle, high = np.percentile(values, [10, 50, 90])
        return {
            "examples": int(rows.sum()),
            "flip_probability_mean": float(values.mean()),
            "flip_probability_std": float(values.std()),
            "flip_probability_p10": float(low),
            "flip_probability_p50": float(middle),
            "flip_probability_p90": float(high),
            "flipped": float(np.mean(noisy[rows] != clean[rows])),
        }

    return {
        "all": summary(np.ones(len(clean), bool)),
        "classes": {names[c]: summary(clean == c) for c in range(len(names)) if np.any(clean == c)},
    }
