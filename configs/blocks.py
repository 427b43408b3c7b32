"""Building blocks the experiment configs compose (each config file stays a short, readable recipe).

Config files call `parse_arg(arg, defaults)` for their "key=value,..." argument and assemble
ml_collections.ConfigDicts from these blocks; the trainer validates the result before compiling.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from contrastive.evaluators.inputs import eval_input, label_eval_pp

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """ "loss=clip,steps=100" -> defaults updated, each value cast to its default's type."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"config arg {item!r}: expected key=value with key in {sorted(defaults)}"
            )
        default = defaults[key]
        if isinstance(default, bool):
            values[key] = text.lower() in ("1", "true", "yes")
        elif default is None:
            values[key] = text
        else:
            try:
                values[key] = type(default)(text)
            except ValueError:
                raise ValueError(
                    f"config arg {item!r}: {key} must be of type {type(default).__name__} "
                    f"(default {default!r})"
                ) from None
    return values


def fashion_mnist_input(
    split: str,
    batch_size: int,
    image_size: int,
    text_length: int,
    training: bool,
    data_dir: str = FASHION_MNIST_DIR,
) -> dict:
    """Fashion-MNIST images (grey -> RGB in [-1, 1]) with built captions and MiniLM WordPiece
    tokens; evaluation reads the split once with no shuffling or flips."""
    pp = f"decode|resize({image_size})|" + ("flip_lr|" if training else "")
    pp += f"value_range(-1, 1)|tokenize(max_len={text_length}, model='minilm')"
    block = dict(
        source=dict(name="fashion_mnist", data_dir=data_dir, split=split),
        pp=pp,
        batch_size=batch_size,
        shuffle_buffer=10_000 if training else 0,
        seed=0,
        prefetch=2,
    )
    if not training:
        block["num_epochs"] = 1
    return block


def caption_records_input(
    files: str,
    image_ops: str,
    text_length: int,
    tokenizer: str,
    batch_size: int,
    shuffle_buffer: int,
) -> dict:
    """Image-caption TFRecords (scripts.make_tfrecords) for training: image_ops (e.g.
    "inception_crop(224)|flip_lr") then [-1, 1] values, captions tokenized to text_length."""
    return dict(
        source=dict(name="tfrecord", files=files),
        pp=(
            f"decode|{image_ops}|value_range(-1, 1)|"
            f"tokenize(max_len={text_length}, model={tokenizer!r})"
        ),
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=0,
        prefetch=2,
    )


def zeroshot_eval(
    dataset: str, input_block: dict, text_length: int, every_steps: int, tokenizer: str = "minilm"
) -> dict:
    return dict(
        kind="zeroshot",
        every_steps=every_steps,
        dataset=dataset,
        input=input_block,
        tokenizer=tokenizer,
        text_length=text_length,
    )


def imagenet_zeroshot(
    data_dir: str,
    image_size: int,
    text_length: int,
    every_steps: int,
    tokenizer: str = "minilm",
    batch_size: int = 1024,
) -> dict:
    """Zero-shot on the 50,000 validation images of TFDS imagenet2012 prepared in data_dir
    (label-only: shorter side resized, centre crop, the caption a label-only source attaches
    dropped), CLIP's ImageNet class names in its 80 templates."""
    source = dict(
        name="tfds",
        dataset="imagenet2012",
        data_dir=data_dir,
        split="validation",
        label_key="label",
    )
    return zeroshot_eval(
        "imagenet1k",
        eval_input(source, label_eval_pp(image_size), batch_size),
        text_length,
        every_steps,
        tokenizer,
    )


def adamw(
    lr: float,
    weight_decay: float = 1e-4,
    warmup_steps: int | None = None,
    warmup_fraction: float | None = None,
    clip_norm: float = 1.0,
    schedule: str = "cosine",
    freeze: list[str] | None = None,
) -> dict:
    warmup = (
        {"warmup_fraction": warmup_fraction}
        if warmup_fraction is not None
        else {"warmup_steps": warmup_steps or 0}
    )
    return dict(
        name="adamw",
        lr=lr,
        weight_decay=weight_decay,
        clip_norm=clip_norm,
        schedule=dict(name=schedule, **warmup),
        freeze=freeze or [],
    )


def loss_block(name: str, column_chunk: int = 1024) -> dict:
    """clip | siglip | hetxl, scoring column_chunk texts at once (HET-XL's Monte-Carlo
    settings are the separate sampling block)."""
    if name not in ("clip", "hetxl", "siglip"):
        raise ValueError(f"loss {name!r} is unknown; known: ['clip', 'hetxl', 'siglip']")
    return dict(name=name, column_chunk_size=column_chunk)


def sampling(samples: int = 16, chunk: int | None = None, chunk_bytes: int = 2**30) -> dict:
    """The Monte-Carlo sampling block: S samples in training and evaluation, chunk at a time
    (None: as many as fit chunk_bytes of logits per device, models/heteroscedastic/sampling.py)."""
    return dict(
        train_samples=samples, eval_samples=samples, chunk_size=chunk, chunk_bytes=chunk_bytes
    )


TEMPERATURES = ("bounded_log", "log_scale", "fixed")


def contrastive_temperature(loss: str, mode: str = "") -> tuple[dict, float | None]:
    """(temperature, SigLIP bias init) for a loss.

    mode "" picks each method's usual parameterisation: HET-XL learns a log-bounded tau in
    [0.01, 1], CLIP and SigLIP CLIP's unbounded log scale. Any loss takes any mode
    ("bounded_log", "log_scale", "fixed"), so that a baseline can differ from HET-XL in nothing
    but the noise. tau starts at CLIP's 0.07 (SigLIP: 0.1, with its paper's bias -10).
    """
    init = 0.1 if loss == "siglip" else 0.07
    mode = mode or ("bounded_log" if loss == "hetxl" else "log_scale")
    if mode == "bounded_log":
        temperature = dict(mode=mode, init=init, lo=0.01, hi=1.0)
    elif mode in ("log_scale", "fixed"):
        temperature = dict(mode=mode, init=init)
    else:
        raise ValueError(f"temperature {mode!r} is unknown; known: {list(TEMPERATURES)}")
    return temperature, (-10.0 if loss == "siglip" else None)


def hetxl_noise(
    loss: str, num_factors: int = 8, scale_init: float = 0.01, kernel_scale: float = 0.01
) -> dict | None:
    """Image-side HET-XL noise for the hetxl loss: d(x) starts at scale_init per coordinate of
    the unit embeddings, the noise layers' kernels at kernel_scale x lecun-normal."""
    if loss != "hetxl":
        return None
    return dict(num_factors=num_factors, diag_scale_init=scale_init, kernel_init_scale=kernel_scale)


def noise_grad_norms(parameters: str | None) -> dict | None:
    """grad_norm_groups logging the gradient reaching the noise layers (regex of their path),
    or None for a model without noise."""
    return None if parameters is None else {"noise": parameters}


def config_dict(**blocks) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(blocks)
