"""Input blocks for evaluation splits: read once, in order, at the model's input shapes.

Configs and scripts/zeroshot_eval.py build their evaluation inputs here, so the preprocessing of an
evaluation split is written once. Nothing heavy is imported: configs may use this module.
"""

from __future__ import annotations

from typing import Any

# Photos are resized so that the shorter side is image_size * 256 / 224 and centre-cropped to
# image_size (the standard ImageNet evaluation: 256 -> 224).
CROP_FRACTION = 224 / 256


def _image_ops(image_size: int, crop: bool) -> str:
    if crop:
        return (
            f"decode|resize_small({round(image_size / CROP_FRACTION)})|central_crop({image_size})"
        )
    return f"decode|resize({image_size})"


def label_eval_pp(image_size: int, crop: bool = True) -> str:
    """Op string for labelled images: f32 [S, S, 3] in [-1, 1] and the label.

    crop: photos (resize the shorter side, centre crop); False resizes the whole image, for
    datasets stored at the model's framing (Fashion-MNIST). Label-only sources attach a caption
    to every record; keep() drops it (and works for sources without one).
    """
    return f"{_image_ops(image_size, crop)}|value_range(-1, 1)|keep('image', 'label')"


def caption_eval_pp(
    image_size: int,
    text_length: int,
    tokenizer: str,
    add_eos: bool = False,
    crop: bool = True,
    keep_label: bool = False,
) -> str:
    """Op string for (image, caption) pairs: the image as label_eval_pp, the caption tokenized as
    the model was trained (tokenizer spec, add_eos, text_length tokens); keep_label also keeps
    the records' "label"."""
    tokenize = f"tokenize(max_len={text_length}, model={tokenizer!r}"
    tokenize += ", add_eos=True)" if add_eos else ")"
    keep = "keep('image', 'text', 'label')" if keep_label else "keep('image', 'text')"
    return f"{_image_ops(image_size, crop)}|value_range(-1, 1)|{tokenize}|{keep}"


def eval_input(source: dict[str, Any], pp: str, batch_size: int) -> dict[str, Any]:
    """A config.input block that reads the split once, unshuffled (every example exactly once)."""
    return dict(
        source=dict(source),
        pp=pp,
        batch_size=batch_size,
        shuffle_buffer=0,
        num_epochs=1,
        prefetch=2,
    )
