"""Preprocessing ops: the vocabulary of the op-string mini-language (see data/preprocess.py).

Each op is a factory registered in PP_OPS: called with the literal arguments written in the op
string, it returns a function from one example (a dict of tensors, unbatched) to a new dict. The
factory's signature and type hints are the op's documentation and are checked when the string is
parsed, before any data flows.

Randomness: random ops take their stateless seed from the example's "_rng" entry, int64 [2] =
(stream, counter): the pipeline sets stream from the config seed (and the process, when each
process reads its own files) and counter to the example's position p in the stream
(data/order.py); each draw advances the counter by 2**40, so the k-th draw of the example at p
uses (stream, p + k * 2**40). Distinct (p, k) give distinct seeds (for fewer than 2**40 positions
per stream), TF's stateless ops scramble seeds into independent Philox streams,
and no random op is spent deriving seeds. Augmentations thus depend only on (seed, position): they
repeat exactly across runs and after a resume. Keys starting with "_" are internal; keep/drop
leave them alone.

Adding an op: define a factory here with `@PP_OPS.register("name")`, type-hinted arguments (int,
float, str, bool, unions with None, tuple[int, int]) and a docstring with shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from data.lazy_tf import tf
from data.registry import Registry
from data.tokenizers import make_tokenizer

Example = dict[str, "tf.Tensor"]
ExampleFn = Callable[[Example], Example]

PP_OPS = Registry("preprocessing op")
RNG_KEY = "_rng"
SEED_STRIDE = 2**40


def next_seed(rng: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(seed for this draw, rng for later draws) from an int64 [2] (stream, counter) seed."""
    return rng, rng + tf.constant([0, SEED_STRIDE], tf.int64)


def _get(data: Example, key: str, op: str) -> tf.Tensor:
    if key not in data:
        public = sorted(k for k in data if not k.startswith("_"))
        raise KeyError(f"op {op!r} reads key {key!r}, but the example has keys {public}")
    return data[key]


def _next_seed(data: Example, op: str) -> tuple[tf.Tensor, Example]:
    """The seed for this op's draw, and the example with its seed advanced for later ops."""
    if RNG_KEY not in data:
        raise KeyError(
            f"random op {op!r} needs a per-example seed under {RNG_KEY!r}; the input pipeline adds "
            "it, direct callers must pass int64 [2]"
        )
    seed, rest = next_seed(data[RNG_KEY])
    return seed, {**data, RNG_KEY: rest}


# Methods whose resize to the input's own size returns the input exactly (interpolating kernels
# sampled at the pixel centres); lanczos is off by float rounding, gaussian and mitchellcubic blur.
IDENTITY_AT_SAME_SIZE = frozenset({"bilinear", "nearest", "bicubic", "area"})


# tf.image.ResizeMethod's values, spelled out so that checking an op string needs no TensorFlow
# (tests/data pins them against TensorFlow's enum).
RESIZE_METHODS = (
    "area", "bicubic", "bilinear", "gaussian", "lanczos3", "lanczos5", "mitchellcubic", "nearest"
)  # fmt: skip


def _check_resize_method(method: str, op: str) -> None:
    if method not in RESIZE_METHODS:
        raise ValueError(f"{op}: unknown method {method!r}; known: {list(RESIZE_METHODS)}")


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _to_three_channels(image: tf.Tensor, allow: tuple[int, ...], op: str) -> tf.Tensor:
    """[H, W, C] -> [H, W, 3]: grey (C=1) and grey+alpha (C=2) are tiled, alpha (C=4) dropped."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels is not None:
        if channels not in allow:
            raise ValueError(
                f"op {op!r} takes images with {allow} channels, got shape {image.shape}"
            )
        return tf.gather(image, [0, 0, 0] if channels < 3 else [0, 1, 2], axis=-1)
    c = tf.shape(image)[-1]
    with tf.control_dependencies(
        [
            tf.debugging.assert_equal(
                tf.reduce_any(tf.equal(c, allow)), True, message=f"{op}: unsupported channel count"
            )
        ]
    ):
        # Channel 0 three times for grey images, the first three channels otherwise.
        index = tf.where(c < 3, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
    return tf.ensure_shape(tf.gather(image, index, axis=-1), [None, None, 3])


@PP_OPS.register("decode")
def decode(key: str = "image", channels: int = 3) -> ExampleFn:
    """Encoded bytes (JPEG/PNG/GIF/BMP) string [] -> uint8 [H, W, channels].

    An image that is already decoded (uint8 [H, W, C], e.g. Fashion-MNIST) passes through, with its
    channels converted, so one op string serves byte and array sources alike. Corrupt bytes raise,
    which the pipeline counts as an "undecodable" record.
    """
    if channels not in (1, 3):
        raise ValueError(f"decode: channels must be 1 or 3, got {channels}")

    def fn(data: Example) -> Example:
        image = _get(data, key, "decode")
        if image.dtype == tf.string:
            image = tf.io.decode_image(image, channels=channels, expand_animations=False)
        elif channels == 3:
            image = _to_three_channels(image, (1, 2, 3, 4), "decode")
        elif image.shape[-1] != 1:
            image = tf.image.rgb_to_grayscale(image[..., :3])
        return {**data, key: tf.ensure_shape(image, [None, None, channels])}

    return fn


@PP_OPS.register("grey_to_rgb")
def grey_to_rgb(key: str = "image") -> ExampleFn:
    """[H, W, 1] grey -> [H, W, 3] by repeating the channel; [H, W, 3] passes through."""

    def fn(data: Example) -> Example:
        image = _get(data, key, "grey_to_rgb")
        return {**data, key: _to_three_channels(image, (1, 3), "grey_to_rgb")}

    return fn


@PP_OPS.register("to_rgb")
def to_rgb(key: str = "image") -> ExampleFn:
    """[H, W, C] with C in 1..4 -> [H, W, 3]: grey (+alpha) repeated, alpha dropped."""

    def fn(data: Example) -> Example:
        return {**data, key: _to_three_channels(_get(data, key, "to_rgb"), (1, 2, 3, 4), "to_rgb")}

    return fn


@PP_OPS.register("resize")
def resize(
    size: int | tuple[int, int],
    key: str = "image",
    method: str = "bilinear",
    antialias: bool = True,
) -> ExampleFn:
    """[H, W, C] -> float32 [h, w, C], values kept in the input's range (e.g. 0..255).

    `size` is h = w or (h, w); `method` is a tf.image.ResizeMethod name. Antialiasing is on by
    default because large downscales (e.g. 512 -> 64) alias badly without it; it is skipped when
    the input is statically known not to shrink (28 -> 32), where it changes nothing but costs
    twice the time. An image that already has the size (statically known) is only cast, where
    the method would return it unchanged.
    """
    height, width = _size_hw(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"resize: size must be positive, got {size}")
    _check_resize_method(method, "resize")

    def fn(data: Example) -> Example:
        image = _get(data, key, "resize")
        in_h, in_w = image.shape[0], image.shape[1]
        if (in_h, in_w) == (height, width) and method in IDENTITY_AT_SAME_SIZE:
            return {**data, key: tf.cast(image, tf.float32)}
        upscale_only = in_h is not None and in_w is not None and in_h <= height and in_w <= width
        resized = tf.image.resize(
            image, (height, width), method=method, antialias=antialias and not upscale_only
        )
        return {**data, key: tf.cast(resized, tf.float32)}

    return fn


@PP_OPS.register("resize_small")
def resize_small(size: int, key: str = "image", method: str = "bilinear") -> ExampleFn:
    """[H, W, C] -> float32 [h, w, C] with min(h, w) = size and the aspect ratio kept."""
    if size <= 0:
        raise ValueError(f"resize_small: size must be positive, got {size}")
    _check_resize_method(method, "resize_small")

    def fn(data: Example) -> Example:
        image = _get(data, key, "resize_small")
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_min(hw)
        new_hw = tf.cast(tf.math.round(hw * scale), tf.int32)
        resized = tf.image.resize(image, new_hw, method=method, antialias=True)
        resized = tf.ensure_shape(resized, [None, None, image.shape[-1]])
        return {**data, key: tf.cast(resized, tf.float32)}

    return fn


@PP_OPS.register("central_crop")
def central_crop(size: int | tuple[int, int], key: str = "image") -> ExampleFn:
    """[H, W, C] -> [h, w, C], the centred window; the image must be at least (h, w)."""
    height, width = _size_hw(size)

    def fn(data: Example) -> Example:
        image = _get(data, key, "central_crop")
        shape = tf.shape(image)
        top = (shape[0] - height) // 2
        left = (shape[1] - width) // 2
        cropped = tf.image.crop_to_bounding_box(image, top, left, height, width)
        return {**data, key: cropped}

    return fn


@PP_OPS.register("random_crop")
def random_crop(size: int | tuple[int, int], key: str = "image") -> ExampleFn:
    """[H, W, C] -> [h, w, C], a uniformly placed window; the image must be at least (h, w)."""
    height, width = _size_hw(size)

    def fn(data: Example) -> Example:
        seed, data = _next_seed(data, "random_crop")
        image = _get(data, key, "random_crop")
        crop_shape = tf.stack([height, width, tf.shape(image)[-1]])
        cropped = tf.image.stateless_random_crop(image, crop_shape, seed=seed)
        return {**data, key: tf.ensure_shape(cropped, [height, width, image.shape[-1]])}

    return fn


@PP_OPS.register("inception_crop")
def inception_crop(
    size: int | tuple[int, int] | None = None,
    area_min: float = 5.0,
    area_max: float = 100.0,
    key: str = "image",
) -> ExampleFn:
    """[H, W, C] -> float32 [h, w, C]: a random window covering area_min..area_max percent of
    the image with aspect ratio 3/4..4/3 (Inception-style), resized to `size` when given
    (uncropped dtype and size otherwise)."""
    if not 0 < area_min <= area_max <= 100:
        raise ValueError(
            f"inception_crop: need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}"
        )

    def fn(data: Example) -> Example:
        seed, data = _next_seed(data, "inception_crop")
        image = _get(data, key, "inception_crop")
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=seed,
            area_range=(area_min / 100, area_max / 100),
            aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0.0,
            use_image_if_no_bounding_boxes=True,
        )
        cropped = tf.slice(image, begin, crop_size)
        if size is not None:
            cropped = tf.image.resize(cropped, _size_hw(size), method="bilinear", antialias=True)
            cropped = tf.ensure_shape(cropped, [*_size_hw(size), image.shape[-1]])
        return {**data, key: cropped}

    return fn


@PP_OPS.register("flip_lr")
def flip_lr(key: str = "image") -> ExampleFn:
    """[H, W, C] -> [H, W, C], mirrored left-right with probability 1/2."""

    def fn(data: Example) -> Example:
        seed, data = _next_seed(data, "flip_lr")
        image = _get(data, key, "flip_lr")
        return {**data, key: tf.image.stateless_random_flip_left_right(image, seed=seed)}

    return fn


@PP_OPS.register("value_range")
def value_range(
    vmin: float,
    vmax: float,
    in_min: float = 0.0,
    in_max: float = 255.0,
    clip: bool = False,
    key: str = "image",
) -> ExampleFn:
    """Any numeric [...] -> float32 [...], mapping [in_min, in_max] linearly onto [vmin, vmax].

    `clip` bounds the result, useful after bicubic resizing overshoots the input range.
    """
    if in_max == in_min:
        raise ValueError("value_range: in_min and in_max must differ")

    def fn(data: Example) -> Example:
        image = tf.cast(_get(data, key, "value_range"), tf.float32)
        scaled = (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
        if clip:
            scaled = tf.clip_by_value(scaled, min(vmin, vmax), max(vmin, vmax))
        return {**data, key: scaled}

    return fn


@PP_OPS.register("to_uint8")
def to_uint8(key: str = "image") -> ExampleFn:
    """Numeric [...] with values in 0..255 -> uint8 [...], rounded to nearest, saturated at 0 and
    255. A quarter of float32's bytes to move to the devices, which scale the values there
    (data/transfer.py)."""

    def fn(data: Example) -> Example:
        image = tf.cast(_get(data, key, "to_uint8"), tf.float32)
        return {**data, key: tf.saturate_cast(tf.round(image), tf.uint8)}

    return fn


@PP_OPS.register("tokenize")
def tokenize(
    max_len: int,
    key: str = "text",
    out_key: str | None = None,
    model: str = "minilm",
    add_eos: bool = False,
) -> ExampleFn:
    """string [] -> int32 [max_len] token ids, 0 = padding, written to out_key (default: key).

    `model` is a tokenizer spec (data/tokenizers.py): "minilm" (default WordPiece vocabulary,
    [CLS] ... [SEP]), "wordpiece:/path/vocab.txt" or "sentencepiece:/path/model". The tokenizer is
    loaded here, at parse time, so a missing model file fails before training.
    """
    if max_len <= 0:
        raise ValueError(f"tokenize: max_len must be positive, got {max_len}")
    tokenizer = make_tokenizer(model, add_eos=add_eos)
    target = out_key or key

    def fn(data: Example) -> Example:
        text = _get(data, key, "tokenize")
        return {**data, target: tokenizer.tokenize(text, max_len)}

    return fn


@PP_OPS.register("keep")
def keep(*keys: str) -> ExampleFn:
    """Keeps only the named keys (and internal "_" keys); naming an absent key is an error."""
    if not keys:
        raise ValueError("keep: name at least one key")

    def fn(data: Example) -> Example:
        for k in keys:
            _get(data, k, "keep")
        return {k: v for k, v in data.items() if k in keys or k.startswith("_")}

    return fn


@PP_OPS.register("drop")
def drop(*keys: str) -> ExampleFn:
    """Removes the named keys; naming an absent key is an error (it is likely a typo)."""
    if not keys:
        raise ValueError("drop: name at least one key")

    def fn(data: Example) -> Example:
        for k in keys:
            _get(data, k, "drop")
        return {k: v for k, v in data.items() if k not in keys}

    return fn
