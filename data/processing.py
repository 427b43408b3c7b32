"""Per-record work of the input pipeline: parse, seed, caption, check, preprocess, count skips.

Every record runs through one function (parse, stateless seed, caption, checks, then the op
string unless a check failed); records whose parsing or preprocessing raised are dropped by
ignore_errors and show up as gaps in this process's record indices, which the counting scan
books as "undecodable". The end marker of a finite stream (data/order.py) skips all of that and
closes the last gap, so that records lost at the very end are counted too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from data.config import InputConfig
from data.ops import RNG_KEY, next_seed
from data.order import COORDS_KEY, POSITION_KEY, RAW_KEY, Selection, is_end_marker, placeholder
from data.preprocess import PreprocessFn, output_spec
from data.records import BAD_RECORD_REASONS, CHECKED_REASONS, bad_record_reason
from data.source_base import Source

SKIPPED_KEY = "_skipped"
REASON_KEY = "_reason"


class NoValidRecordsError(ValueError):
    """A process's share of the source has no record that survives checks and preprocessing."""


class BatchContractError(ValueError):
    """The op string's output does not fit the batch contract."""


def check_batch_contract(
    spec: dict[str, tf.TensorSpec], image_dtype: tf.DType = tf.float32
) -> None:
    """Checks one preprocessed example's spec against the batch contract (before batching).

    {"image": `image_dtype` [H, W, 3], "text": i32 [L] and/or "label": i32 []}, other keys numeric
    with static shapes (they must become jax arrays).
    """
    problems = []
    if "image" not in spec:
        problems.append("no 'image'")
    else:
        image = spec["image"]
        if (
            image.dtype != image_dtype
            or image.shape.rank != 3
            or image.shape[-1] != 3
            or not image.shape.is_fully_defined()
        ):
            problems.append(
                f"'image' is {image.dtype.name} {image.shape}, needs {image_dtype.name} [H, W, 3] "
                "with fixed H, W (end with resize/crop to a size, an RGB op and "
                "value_range(-1, 1))"
            )
    if "text" not in spec and "label" not in spec:
        problems.append("neither 'text' nor 'label'")
    if "text" in spec and (
        spec["text"].dtype != tf.int32
        or spec["text"].shape.rank != 1
        or not spec["text"].shape.is_fully_defined()
    ):
        problems.append(
            f"'text' is {spec['text'].dtype.name} {spec['text'].shape}, needs int32 "
            "[L] token ids (add tokenize(max_len=...))"
        )
    if "label" in spec and (spec["label"].dtype != tf.int32 or spec["label"].shape.rank != 0):
        problems.append(
            f"'label' is {spec['label'].dtype.name} {spec['label'].shape}, needs int32 []"
        )
    for key, s in spec.items():
        if key in ("image", "text", "label"):
            continue
        if s.dtype == tf.string or not s.shape.is_fully_defined():
            problems.append(
                f"{key!r} is {s.dtype.name} {s.shape}; extra keys must be numeric "
                "with fixed shapes (drop it with drop(...))"
            )
    if problems:
        raise BatchContractError(
            "preprocessed examples break the batch contract: " + "; ".join(problems)
        )


def stream_id(seed: int, process_index: int) -> int:
    """A 63-bit id for (seed, process): the first half of every example's stateless seed.

    Processes that share one global stream (example-level sharding) all use process_index 0, so
    an example's augmentations do not depend on which process reads it.
    """
    state = np.random.SeedSequence([seed, process_index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _prepare_fn(source: Source, cfg: InputConfig, stream: int):
    """(position, element) -> (reason, features with "_rng"): parse, seed, caption, check."""

    def prepare(position: tf.Tensor, element: Any) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        record = dict(source.parse(element))
        # (stream, position) seeds are distinct per example and cost no random op (data/ops.py).
        rng = tf.stack([tf.constant(stream, tf.int64), position])
        if source.captions is not None:
            caption_seed, rng = next_seed(rng)
            record["text"] = source.captions.sample(record["label"], caption_seed)
        reason = bad_record_reason(record, cfg.max_text_bytes)
        features = {k: v for k, v in record.items() if not k.startswith("_")}
        return reason, {**features, RNG_KEY: rng}

    return prepare


def process_fn(
    source: Source, cfg: InputConfig, stream: int, pp_fn: PreprocessFn, element_spec: Any
) -> tuple[Callable[[dict[str, Any]], dict[str, tf.Tensor]], dict[str, tf.TensorSpec]]:
    """The per-record function of the pipeline and the spec of its preprocessed features (traced,
    no data read).

    It maps {RAW_KEY, POSITION_KEY, COORDS_KEY} (data/order.py) to {**preprocessed features,
    POSITION_KEY, COORDS_KEY, REASON_KEY}. Preparation and the op string run in one function: one
    call per record instead of two. Records that fail a check skip the op string (tf.cond runs
    one branch) and carry placeholders until the counting scan has seen their reason. In a
    finite pass (cfg.num_epochs set), the end marker is passed on with placeholders and reason 0,
    unparsed; an endless stream has no end marker and pays for no test.
    """
    prepare = _prepare_fn(source, cfg, stream)
    position_spec = tf.TensorSpec([], tf.int64)
    _, features_spec = (
        tf.function(prepare, autograph=False)
        .get_concrete_function(position_spec, element_spec)
        .structured_outputs
    )
    features_spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), features_spec)
    out_spec = output_spec(pp_fn, features_spec)
    out_spec = {k: v for k, v in out_spec.items() if not k.startswith("_")}

    def run_pp(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = pp_fn(features)
        return {k: out[k] for k in out_spec}

    def placeholders() -> dict[str, tf.Tensor]:
        return {k: placeholder(v) for k, v in out_spec.items()}

    def process_record(item: dict[str, Any]) -> dict[str, tf.Tensor]:
        reason, features = prepare(item[POSITION_KEY], item[RAW_KEY])
        out = tf.cond(tf.equal(reason, 0), lambda: run_pp(features), placeholders)
        return {
            **out,
            POSITION_KEY: item[POSITION_KEY],
            COORDS_KEY: item[COORDS_KEY],
            REASON_KEY: reason,
        }

    if cfg.num_epochs is None:
        return process_record, out_spec

    def pass_end_marker(item: dict[str, Any]) -> dict[str, tf.Tensor]:
        return {
            **placeholders(),
            POSITION_KEY: item[POSITION_KEY],
            COORDS_KEY: item[COORDS_KEY],
            REASON_KEY: tf.constant(0, tf.int32),
        }

    def process(item: dict[str, Any]) -> dict[str, tf.Tensor]:
        return tf.cond(
            is_end_marker(item[COORDS_KEY]),
            lambda: pass_end_marker(item),
            lambda: process_record(item),
        )

    return process, out_spec


def count_skipped_fn(selection: Selection):
    """Scan step: cumulative skipped counts per reason (int64 [len(BAD_RECORD_REASONS)]).

    The scan state is (this process's index of the last record seen, counts). Checked reasons are
    read off each record; indices missing from the stream (records dropped by ignore_errors
    because parsing or preprocessing raised) count as undecodable. The end marker stands at the
    index one past this process's last record, so the records missing before it count too.
    """

    def count(state: tuple[tf.Tensor, tf.Tensor], element: dict[str, tf.Tensor]):
        last_index, counts = state
        # A kept record's index is the number of kept positions before it; the end marker's
        # position is that of the stream's last record, whose successor it stands for.
        past = tf.cast(is_end_marker(element[COORDS_KEY]), tf.int64)
        index = selection.kept_before(element[POSITION_KEY] + past)
        # one_hot(-1) is all zeros, so good records (reason 0) add nothing.
        checked = tf.one_hot(element[REASON_KEY] - 1, len(BAD_RECORD_REASONS), dtype=tf.int64)
        undecodable = tf.one_hot(len(CHECKED_REASONS), len(BAD_RECORD_REASONS), dtype=tf.int64)
        counts = counts + checked + (index - last_index - 1) * undecodable
        return (index, counts), {**element, SKIPPED_KEY: counts}

    return count


def is_good(element: dict[str, tf.Tensor]) -> tf.Tensor:
    """True for records to batch, and for the end marker, which brings the final counts to the
    last batch (the pipeline removes its row there)."""
    return tf.equal(element[REASON_KEY], 0)


def _short_error(error: tf.errors.OpError) -> str:
    """The op's own message, without the tf.data function and iterator names around it."""
    line = error.message.strip().splitlines()[0]
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
    line = re.sub(r"^.*?Iterator::[\w:]*?: ", "", line)
    return line[:300]


def check_has_valid_record(stream: tf.data.Dataset, failure: str) -> None:
    """Reads processed records (with REASON_KEY) until one survives; raises NoValidRecordsError
    with `failure` and the skipped counts if none does."""
    counts = np.zeros(len(BAD_RECORD_REASONS), np.int64)
    first_error = ""
    iterator = iter(stream)
    while True:
        try:
            reason = int(next(iterator)[REASON_KEY])
        except StopIteration:
            break
        except tf.errors.OpError as e:
            counts[-1] += 1
            first_error = first_error or _short_error(e)
            continue
        if reason == 0:
            return
        counts[reason - 1] += 1
    skipped = dict(zip(BAD_RECORD_REASONS, counts.tolist(), strict=True))
    detail = f"; first preprocessing error: {first_error}" if first_error else ""
    raise NoValidRecordsError(f"{failure} ({int(counts.sum())} records; skipped {skipped}){detail}")
