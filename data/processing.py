"""Per-record work of the input pipeline: parse, seed, caption, check, preprocess, count skips.

Every record runs through one function (parse, stateless seed, caption, checks, then the op
string unless a check failed); records whose parsing or preprocessing raised are dropped by
ignore_errors and show up as gaps in this process's record indices, which the counting scan
books as "undecodable". The end marker of a finite stream (data/order.py) skips all of that and
closes the last gap, so that records lost at the very end are counted too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from data.config import InputConfig
from data.lazy_tf import tf
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


def check_batch_contract(spec: dict[str, tf.TensorSpec], image_dtype: tf.DType) -> None:
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
    """(position, element) -> (reason, features with "_rng"): parse, seed, caption, check. The
    reason is None when no check can fail (data/records.py)."""
    # A caption bank is checked once here instead of every drawn caption in every epoch.
    vetted_text = source.captions is not None and source.captions.passes_text_checks(
        cfg.max_text_bytes
    )

    def prepare(position: tf.Tensor, element: Any) -> tuple[tf.Tensor | None, dict[str, tf.Tensor]]:
        record = dict(source.parse(element))
        # (stream, position) seeds are distinct per example and cost no random op (data/ops.py).
        rng = tf.stack([tf.constant(stream, tf.int64), position])
        if source.captions is not None:
            caption_seed, rng = next_seed(rng)
            record["text"] = source.captions.sample(record["label"], caption_seed)
        reason = bad_record_reason(record, cfg.max_text_bytes, vetted_text=vetted_text)
        features = {k: v for k, v in record.items() if not k.startswith("_")}
        return reason, {**features, RNG_KEY: rng}

    return prepare


@dataclasses.dataclass(frozen=True)
class RecordProcessing:
    """The per-record function of the pipeline (see process_fn).

    fn: {RAW_KEY, POSITION_KEY, COORDS_KEY} -> {**preprocessed features, POSITION_KEY,
      COORDS_KEY, REASON_KEY}.
    out_spec: the preprocessed features' specs (traced, no data read).
    may_fail_checks: False when no record check can fail (data/records.py): every REASON_KEY is
      0, and the pipeline neither filters nor counts checked reasons.
    """

    fn: Callable[[dict[str, Any]], dict[str, tf.Tensor]]
    out_spec: dict[str, tf.TensorSpec]
    may_fail_checks: bool


def process_fn(
    source: Source, cfg: InputConfig, stream: int, pp_fn: PreprocessFn, element_spec: Any
) -> RecordProcessing:
    """The per-record function of the pipeline, traced once for its output spec (no data read).

    Preparation and the op string run in one function: one call per record instead of two.
    Records that fail a check skip the op string (tf.cond runs one branch) and carry placeholders
    until the counting scan has seen their reason; when no check can fail, there is no branch.
    In a finite pass (cfg.num_epochs set), the end marker is passed on with placeholders and
    reason 0, unparsed; an endless stream has no end marker and pays for no test.
    """
    prepare = _prepare_fn(source, cfg, stream)
    position_spec = tf.TensorSpec([], tf.int64)
    reason_spec, features_spec = (
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
        if reason is None:
            reason, out = tf.constant(0, tf.int32), run_pp(features)
        else:
            out = tf.cond(tf.equal(reason, 0), lambda: run_pp(features), placeholders)
        return {
            **out,
            POSITION_KEY: item[POSITION_KEY],
            COORDS_KEY: item[COORDS_KEY],
            REASON_KEY: reason,
        }

    may_fail_checks = reason_spec is not None
    if cfg.num_epochs is None:
        return RecordProcessing(process_record, out_spec, may_fail_checks)

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

    return RecordProcessing(process, out_spec, may_fail_checks)


def count_checked(counts: tf.Tensor, element: dict[str, tf.Tensor]):
    """Per-record scan step, for streams whose records may fail a check: cumulative counts of
    the checked reasons (int64 [len(BAD_RECORD_REASONS)], undecodable left at 0) under
    SKIPPED_KEY, before the filter drops the records that failed."""
    # one_hot(-1) is all zeros, so good records (reason 0) add nothing.
    counts += tf.one_hot(element[REASON_KEY] - 1, len(BAD_RECORD_REASONS), dtype=tf.int64)
    return counts, {**element, SKIPPED_KEY: counts}


def count_skipped_fn(selection: Selection, *, finite: bool):
    """Per-batch scan step: the cumulative skipped counts per reason after each batch, as
    SKIPPED_KEY int64 [len(BAD_RECORD_REASONS)].

    The scan state is (this process's index of the last record batched, records missing so far).
    Every index missing from the batches is a skipped record: one that failed a check (its reason
    counted by count_checked into the rows' SKIPPED_KEY before the filter dropped it) or one
    dropped by ignore_errors because parsing or preprocessing raised ("undecodable": the rest).
    Counted once per batch, from its last row: a sequential scan per record cost ~10 CPU-ms per
    batch of 256 on the demo's input. In a `finite` pass the end marker stands at the index one
    past this process's last record, so the records missing before it count too.
    """
    undecodable = tf.constant(np.eye(len(BAD_RECORD_REASONS), dtype=np.int64)[len(CHECKED_REASONS)])

    def count(state: tuple[tf.Tensor, tf.Tensor], batch: dict[str, tf.Tensor]):
        last_index, missing = state
        position = batch[POSITION_KEY][-1]
        if finite:
            # A kept record's index is the number of kept positions before it; the end marker's
            # position is that of the stream's last record, whose successor it stands for.
            position += tf.cast(is_end_marker(batch[COORDS_KEY][-1]), tf.int64)
        index = selection.kept_before(position)
        rows = tf.shape(batch[POSITION_KEY], out_type=tf.int64)[0]
        missing += index - last_index - rows
        checked = batch[SKIPPED_KEY][-1] if SKIPPED_KEY in batch else tf.zeros_like(undecodable)
        counts = checked + (missing - tf.reduce_sum(checked)) * undecodable
        return (index, missing), {**batch, SKIPPED_KEY: counts}

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
