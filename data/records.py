"""The raw record every source yields, and the in-graph checks that find bad records.

A raw record is a dict of tensors:
  "image":    string [] (encoded bytes: JPEG, PNG, GIF, BMP) or uint8 [H, W, C] (decoded pixels)
  "text":     string [] caption (absent when the source has labels only and no caption bank)
  "label":    int32 [] class index (optional)
  "_missing": bool [] true when the stored record lacked a required field

Bad records are dropped and counted per reason rather than crashing a long run. The cheap checks
below run before preprocessing; records whose preprocessing raises (corrupt or truncated image
bytes, unparsable protos) are counted as "undecodable" by the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.lazy_tf import tf

MISSING = "_missing"

# Order matters: a record is counted once, under the first reason that applies.
CHECKED_REASONS = ("missing_field", "empty_image", "empty_text", "text_too_long", "text_not_utf8")
UNDECODABLE = "undecodable"
BAD_RECORD_REASONS = (*CHECKED_REASONS, UNDECODABLE)


def _image_is_empty(image: tf.Tensor) -> tf.Tensor | bool:
    """bool [] (a Python bool when the image's shape decides it: decoded pixels of static shape)."""
    if image.dtype == tf.string:
        return tf.equal(tf.strings.length(image), 0)
    if image.shape.is_fully_defined():
        return image.shape.num_elements() == 0
    return tf.equal(tf.size(image), 0)


def text_flags(text: tf.Tensor, max_text_bytes: int) -> dict[str, tf.Tensor]:
    """The text checks, elementwise on string [...]: reason -> bool [...]."""
    # Transcoding valid UTF-8 to UTF-8 is the identity; dropping invalid bytes changes it.
    valid = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore")
    return {
        "empty_text": tf.equal(tf.strings.length(tf.strings.strip(text)), 0),
        "text_too_long": tf.strings.length(text) > max_text_bytes,
        "text_not_utf8": tf.not_equal(valid, text),
    }


def texts_pass_checks(texts: Sequence[str | bytes], max_text_bytes: int) -> bool:
    """True when every one of `texts` passes the text checks: a caption drawn from them needs no
    per-record check (see bad_record_reason's vetted_text)."""
    flags = text_flags(tf.constant(list(texts), tf.string), max_text_bytes)
    return not any(bool(tf.reduce_any(flag)) for flag in flags.values())


def bad_record_reason(
    record: dict[str, tf.Tensor], max_text_bytes: int, *, vetted_text: bool = False
) -> tf.Tensor | None:
    """int32 []: 0 for a usable record, else 1 + the index of its reason in CHECKED_REASONS; None
    when no check can fail for records of this structure.

    Args:
      record: a raw record (see module docstring); "text" is checked only when present.
      max_text_bytes: captions longer than this (in UTF-8 bytes) are "text_too_long"; real captions
        are far shorter, and a megabyte "caption" is a scraping accident, not text to truncate.
      vetted_text: the text comes from a set that passed texts_pass_checks; it is not checked
        again.

    Checks whose answer the record's structure already gives are decided while tracing: a decoded
    image of static, non-empty shape is never empty. When nothing is left to check (such an image,
    no missing-field flag, vetted or no text), the result is None and the pipeline skips the
    per-record checking altogether.
    """
    # This runs once per record, so it uses few ops: per-op overhead dominates its cost.
    flags = {"empty_image": _image_is_empty(record["image"])}
    if MISSING in record:
        flags["missing_field"] = record[MISSING]
    if "text" in record and not vetted_text:
        flags.update(text_flags(record["text"], max_text_bytes))
    flags = {name: flag for name, flag in flags.items() if flag is not False}
    if not flags:
        return None
    reason = tf.constant(0, tf.int32)
    # Last reason first, so that the first applicable reason is the one left standing.
    for index in reversed(range(len(CHECKED_REASONS))):
        if CHECKED_REASONS[index] in flags:
            reason = tf.where(flags[CHECKED_REASONS[index]], index + 1, reason)
    return reason
