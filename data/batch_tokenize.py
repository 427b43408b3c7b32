"""Tokenizing a batch of captions at once instead of one caption per record.

A `tokenize` op costs about a hundred TensorFlow ops (WordPiece or SentencePiece, ragged
concatenation, padding) whatever the number of strings it is given. Run once per record, that
fixed cost is the largest part of an input pipeline's CPU: 27 of ~65 CPU-ms per batch of 256 on
the demo's input, against 1 ms for the same batch tokenized at once. On a CPU that also trains,
every millisecond the pipeline spends is taken from the step.

So when an op string's tokenize ops can run after batching without changing any result, the
pipeline (data/pipeline.py) runs them there, on [B] strings. A tokenize op can move when every op
after it is either another tokenize op that moves, or a built-in single-key op (KEY_ONLY_OPS)
that reads and writes neither the tokenize op's input nor its output key: those commute with it,
and tokenizers map each string on its own, so each row of the batch equals the record's own
result (tested). Any other later op (keep, drop, a user-registered op) keeps the tokenize op per
record. Tokenize draws no random numbers, so moving it changes no augmentation.
"""

from __future__ import annotations

from data.lazy_tf import tf
from data.preprocess import PreprocessFn, bound_arguments, output_spec

TOKENIZE = "tokenize"
# Built-in ops that read and write only the example under their `key` (and the per-example seed).
KEY_ONLY_OPS = frozenset(
    {
        "decode",
        "grey_to_rgb",
        "to_rgb",
        "resize",
        "resize_small",
        "central_crop",
        "random_crop",
        "inception_crop",
        "flip_lr",
        "value_range",
        "to_uint8",
    }
)


def _tokenize_keys(arguments: dict) -> set[str]:
    return {arguments["key"], arguments["out_key"] or arguments["key"]}


def split_batch_tokenize(pp_fn: PreprocessFn) -> tuple[PreprocessFn, PreprocessFn | None]:
    """(per-record op string, batch op string): the tokenize ops that can run on whole batches,
    moved out of pp_fn in their order, or (pp_fn, None) when none can.

    The batch op string takes a batch of records (string [B] captions) and returns what pp_fn
    would have given each record, stacked (int32 [B, max_len] token ids).
    """
    moved: list[int] = []
    stays: list[int] = []  # indices of the ops after the current one that stay per record
    for index in reversed(range(len(pp_fn.ops))):
        name, args, kwargs = pp_fn.ops[index]
        if name == TOKENIZE:
            keys = _tokenize_keys(bound_arguments(name, args, kwargs))
            if all(
                pp_fn.ops[later][0] in KEY_ONLY_OPS
                and bound_arguments(*pp_fn.ops[later])["key"] not in keys
                for later in stays
            ):
                moved.insert(0, index)
                continue
        stays.insert(0, index)
    if not moved:
        return pp_fn, None
    numbers = ", ".join(str(index + 1) for index in moved)
    per_record = PreprocessFn(
        f"{pp_fn.pp} (per record: without op {numbers})",
        [pp_fn.ops[index] for index in stays],
        [pp_fn.fns[index] for index in stays],
    )
    per_batch = PreprocessFn(
        f"{pp_fn.pp} (per batch: op {numbers})",
        [pp_fn.ops[index] for index in moved],
        [pp_fn.fns[index] for index in moved],
    )
    return per_record, per_batch


def record_spec(
    per_batch: PreprocessFn | None, spec: dict[str, tf.TensorSpec]
) -> dict[str, tf.TensorSpec]:
    """The spec of one record after the whole op string, from the spec of one record after its
    per-record part (traced on one record, no data read)."""
    if per_batch is None:
        return spec
    return output_spec(per_batch, spec)
