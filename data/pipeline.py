"""Per-process input pipelines: shuffling, bad-record accounting, batching, global arrays, resume.

Per process, the tf.data graph is

    source.records(process)            this process's share of the source (files or examples)
    -> shuffle(seed) -> repeat          seeded, so the order is a function of the seed
    -> enumerate                        position p of each record in the process's stream
    -> map: parse, caption, check,      stateless seed (stream(seed, process), p); a record that
            preprocess (op string)      fails a check gets a reason and skips the op string
    -> ignore_errors                    records whose parsing/preprocessing raised disappear
    -> scan: count skipped records      checked reasons, plus gaps in p as "undecodable"
    -> filter good -> batch(global batch / processes) -> prefetch

and each batch carries the cumulative skipped-record counts of the stream consumed so far.

Exact resume. The iterator's position is the tf.data iterator state (tf.train.Checkpoint of the
iterator), serialized to a uint8 array that can sit in the train-state checkpoint. Restoring it
costs the same for step 10 or step 10 million: it holds file offsets, the shuffle buffer of raw
records and the batches in flight, not a replay of the stream (skipping k records would read k
records). Its size is about shuffle_buffer x raw record size + prefetch x batch size, which is why
the shuffle runs on compact raw records before decoding. Augmentations and captions use stateless
randomness keyed by stream position, so they too replay exactly after a restore.

Bad records never stop a run: the checked reasons (data/records.py) and records whose
preprocessing raised ("undecodable": corrupt or truncated images, malformed protos) are dropped and
counted. Before the first batch, a probe reads this process's share until one record survives
preprocessing; a share with none raises NoValidRecordsError with the counts instead of spinning
forever on an infinite repeat of bad records.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.config import InputConfig, validate_input_config
from data.ops import RNG_KEY, next_seed
from data.preprocess import PreprocessFn, output_spec, parse_pp
from data.records import BAD_RECORD_REASONS, CHECKED_REASONS, bad_record_reason
from data.source_base import Source, check_process
from data.sources import make_source

SKIPPED_KEY = "_skipped"
POSITION_KEY = "_position"
REASON_KEY = "_reason"
STATE_VERSION = 1


class NoValidRecordsError(ValueError):
    """A process's share of the source has no record that survives checks and preprocessing."""


class BatchContractError(ValueError):
    """The op string's output does not fit the batch contract."""


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global / process_count; raises ValueError when it does not divide evenly."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}"
        )
    return global_batch_size // process_count


def check_batch_contract(spec: dict[str, tf.TensorSpec]) -> None:
    """Checks one preprocessed example's spec against the batch contract (before batching).

    {"image": f32 [H, W, 3], "text": i32 [L] and/or "label": i32 []}, other keys numeric with static
    shapes (they must become jax arrays).
    """
    problems = []
    if "image" not in spec:
        problems.append("no 'image'")
    else:
        image = spec["image"]
        if (
            image.dtype != tf.float32
            or image.shape.rank != 3
            or image.shape[-1] != 3
            or not image.shape.is_fully_defined()
        ):
            problems.append(
                f"'image' is {image.dtype.name} {image.shape}, needs float32 [H, W, 3] with fixed "
                "H, W (end with resize/crop to a size, an RGB op and value_range(-1, 1))"
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
    """A 63-bit id for (seed, process): the first half of every example's stateless seed."""
    state = np.random.SeedSequence([seed, process_index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _prepare_fn(source: Source, cfg: InputConfig, process_index: int):
    """(position, raw) -> (reason, features with "_rng"): parse, seed, caption, check."""
    stream = stream_id(cfg.seed, process_index)

    def prepare(position: tf.Tensor, raw: Any) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        record = dict(source.parse(raw))
        # (stream, position) seeds are distinct per example and cost no random op (data/ops.py).
        rng = tf.stack([tf.constant(stream, tf.int64), position])
        if source.captions is not None:
            caption_seed, rng = next_seed(rng)
            record["text"] = source.captions.sample(record["label"], caption_seed)
        reason = bad_record_reason(record, cfg.max_text_bytes)
        features = {k: v for k, v in record.items() if not k.startswith("_")}
        return reason, {**features, RNG_KEY: rng}

    return prepare


def _placeholder(spec: tf.TensorSpec) -> tf.Tensor:
    """A value of `spec` (unknown dimensions as 0) standing in for a skipped record's output."""
    shape = [0 if d is None else d for d in spec.shape.as_list()]
    if spec.dtype == tf.string:
        return tf.fill(shape, "")
    return tf.zeros(shape, spec.dtype)


def _process_fn(
    source: Source, cfg: InputConfig, process_index: int, pp_fn: PreprocessFn, raw_spec: Any
):
    """(position, raw) -> {"_position", "_reason", **preprocessed features}, and the spec of the
    preprocessed features (traced, no data read).

    Preparation and the op string run in one function: one call per record instead of two.
    Records that fail a check skip the op string (tf.cond runs one branch) and carry placeholders
    until the counting scan has seen their reason.
    """
    prepare = _prepare_fn(source, cfg, process_index)
    position_spec = tf.TensorSpec([], tf.int64)
    _, features_spec = (
        tf.function(prepare, autograph=False)
        .get_concrete_function(position_spec, raw_spec)
        .structured_outputs
    )
    features_spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), features_spec)
    out_spec = output_spec(pp_fn, features_spec)
    out_spec = {k: v for k, v in out_spec.items() if not k.startswith("_")}

    def run_pp(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = pp_fn(features)
        return {k: out[k] for k in out_spec}

    def process(position: tf.Tensor, raw: Any) -> dict[str, tf.Tensor]:
        reason, features = prepare(position, raw)
        out = tf.cond(
            tf.equal(reason, 0),
            lambda: run_pp(features),
            lambda: {k: _placeholder(v) for k, v in out_spec.items()},
        )
        return {**out, POSITION_KEY: position, REASON_KEY: reason}

    return process, out_spec


def _processed_stream(
    records: tf.data.Dataset, cfg: InputConfig, process: Any, training: bool
) -> tf.data.Dataset:
    if training:
        if cfg.shuffle_buffer > 1:
            records = records.shuffle(
                cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True
            )
        records = records.repeat(cfg.num_epochs)
    parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True} if training else {}
    # The functions have no Python control flow on tensors; skipping autograph saves tracing.
    return records.enumerate().map(tf.autograph.experimental.do_not_convert(process), **parallel)


def _count_skipped(state: tuple[tf.Tensor, tf.Tensor], element: dict[str, tf.Tensor]):
    """Scan step: cumulative skipped counts per reason (int64 [len(BAD_RECORD_REASONS)]).

    Checked reasons are read off each record; positions missing from the stream (dropped by
    ignore_errors because parsing or preprocessing raised) count as undecodable.
    """
    last_position, counts = state
    position, reason = element[POSITION_KEY], element[REASON_KEY]
    # one_hot(-1) is all zeros, so good records (reason 0) add nothing.
    checked = tf.one_hot(reason - 1, len(BAD_RECORD_REASONS), dtype=tf.int64)
    undecodable = tf.one_hot(len(CHECKED_REASONS), len(BAD_RECORD_REASONS), dtype=tf.int64)
    counts = counts + checked + (position - last_position - 1) * undecodable
    return (position, counts), {**element, SKIPPED_KEY: counts}


def _is_good(element: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.equal(element[REASON_KEY], 0)


def build_local_dataset(
    cfg: InputConfig, process_index: int, process_count: int, *, probe: bool = True
) -> tf.data.Dataset:
    """This process's batches: {key: [b, ...]} with b = batch_size / process_count, plus
    "_skipped": int64 [len(BAD_RECORD_REASONS)] cumulative skipped-record counts.

    Raises BatchContractError when the op string's output does not fit the contract, and (with
    `probe`) NoValidRecordsError when this process's share has no usable record.
    """
    check_process(process_index, process_count)
    batch = per_process_batch_size(cfg.batch_size, process_count)
    source = make_source(cfg.source_name, **cfg.source_options)
    pp_fn = parse_pp(cfg.pp)
    records = source.records(process_index, process_count, cfg.seed)
    process, out_spec = _process_fn(source, cfg, process_index, pp_fn, records.element_spec)
    # Contract first (from traced shapes, no data read), then the probe (reads data).
    check_batch_contract(out_spec)
    if probe:
        _check_has_valid_record(
            _processed_stream(records, cfg, process, training=False),
            f"process {process_index}/{process_count}: no valid record in {source.describe()}",
        )
    ds = _processed_stream(records, cfg, process, training=True).ignore_errors()
    initial = (tf.constant(-1, tf.int64), tf.zeros([len(BAD_RECORD_REASONS)], tf.int64))
    ds = ds.scan(initial, tf.autograph.experimental.do_not_convert(_count_skipped))
    ds = ds.filter(tf.autograph.experimental.do_not_convert(_is_good))
    # Training repeats forever and needs fixed shapes; a finite pass (evaluation) keeps the last,
    # short batch, which evaluators pad and mask.
    ds = ds.batch(batch, drop_remainder=cfg.num_epochs is None)
    # Counts are cumulative, so the batch's last row is the count up to its last example.
    ds = ds.map(
        tf.autograph.experimental.do_not_convert(
            lambda b: {**{k: b[k] for k in out_spec}, SKIPPED_KEY: b[SKIPPED_KEY][-1]}
        )
    )
    if cfg.prefetch:
        ds = ds.prefetch(cfg.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _short_error(error: tf.errors.OpError) -> str:
    """The op's own message, without the tf.data function and iterator names around it."""
    line = error.message.strip().splitlines()[0]
    line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
    line = re.sub(r"^.*?Iterator::[\w:]*?: ", "", line)
    return line[:300]


def _check_has_valid_record(stream: tf.data.Dataset, failure: str) -> None:
    """Reads one pass of processed records until one survives; raises `failure` with the skipped
    counts if none does."""
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


class LocalBatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterates this process's batches as numpy arrays; tracks skipped counts; saves/restores.

    Yields {"image": f32 [b, H, W, 3], "text": i32 [b, L], optional "label": i32 [b], ...} with
    b = global batch size / process count.
    """

    def __init__(self, cfg: InputConfig, process_index: int = 0, process_count: int = 1) -> None:
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        self.dataset = build_local_dataset(cfg, process_index, process_count)
        self._iterator = iter(self.dataset)
        self._skipped = np.zeros(len(BAD_RECORD_REASONS), np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._skipped = batch.pop(SKIPPED_KEY).numpy()
        return {k: v.numpy() for k, v in batch.items()}

    def skipped(self) -> dict[str, int]:
        """Records skipped so far by this process, per reason (for logging as metrics)."""
        return dict(zip(BAD_RECORD_REASONS, self._skipped.tolist(), strict=True))

    def _layout(self) -> dict[str, Any]:
        return {
            "process_index": self.process_index,
            "process_count": self.process_count,
            "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "pp": self.cfg.pp,
            "source": repr(sorted(self.cfg.source.items())),
        }

    def get_state(self) -> np.ndarray:
        """uint8 [n]: the position after the last batch returned, for a train-state checkpoint."""
        files = {}
        with tempfile.TemporaryDirectory() as tmp:
            tf.train.Checkpoint(iterator=self._iterator).write(f"{tmp}/iterator")
            for path in Path(tmp).iterdir():
                files[path.name] = np.frombuffer(path.read_bytes(), np.uint8)
        meta = {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "skipped": self._skipped.tolist(),
        }
        buffer = io.BytesIO()
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **files)
        return np.frombuffer(buffer.getvalue(), np.uint8)

    def set_state(self, state: np.ndarray) -> None:
        """Restores get_state()'s output: the next batch is the one that followed it.

        The pipeline must be built from the same input config and process layout.
        """
        with np.load(io.BytesIO(np.asarray(state, np.uint8).tobytes())) as archive:
            meta = json.loads(archive["__meta__"].tobytes())
            files = {name: archive[name].tobytes() for name in archive.files if name != "__meta__"}
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"input state version {meta.get('version')}, expected {STATE_VERSION}")
        if meta["layout"] != self._layout():
            raise ValueError(
                f"input state was saved with {meta['layout']}, this pipeline is {self._layout()}"
            )
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            tf.train.Checkpoint(iterator=self._iterator).read(f"{tmp}/iterator").assert_consumed()
        self._skipped = np.asarray(meta["skipped"], np.int64)


def check_mesh(global_batch_size: int, mesh: Mesh, data_axis: str | tuple[str, ...]) -> None:
    """Raises ValueError unless `mesh` has the data axis (or axes, e.g. ("data", "fsdp") when the
    batch is split over both) and their total size divides the batch."""
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    missing = [axis for axis in axes if axis not in mesh.axis_names]
    if missing:
        names = ", ".join(repr(axis) for axis in missing)
        raise ValueError(f"mesh has no axis {names}; axes: {mesh.axis_names}")
    size = int(np.prod([mesh.shape[axis] for axis in axes]))
    if global_batch_size % size:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the mesh's "
            f"{data_axis!r} size {size}"
        )


class GlobalBatchIterator(Iterator[dict[str, jax.Array]]):
    """Global jax arrays sharded over `mesh`'s data axis, built from every process's batches.

    Yields {"image": f32 [B, H, W, 3], "text": i32 [B, L], optional "label": i32 [B]} with B the
    global batch size; process i supplies rows [i * b, (i + 1) * b) of its addressable shards.
    """

    def __init__(
        self, local: LocalBatchIterator, mesh: Mesh, data_axis: str | tuple[str, ...] = "data"
    ) -> None:
        check_mesh(local.cfg.batch_size, mesh, data_axis)
        self.local = local
        self.sharding = NamedSharding(mesh, PartitionSpec(data_axis))

    def __next__(self) -> dict[str, jax.Array]:
        batch = next(self.local)
        return {
            key: jax.make_array_from_process_local_data(
                self.sharding, value, (value.shape[0] * self.local.process_count, *value.shape[1:])
            )
            for key, value in batch.items()
        }

    def skipped(self) -> dict[str, int]:
        """Skipped-record counts per reason, summed over all processes.

        With several processes this is a collective (an all-gather of a few integers): every
        process must call it at the same point, as the trainer does at its logging steps.
        """
        counts = self.local.skipped()
        if self.local.process_count == 1:
            return counts
        per_process = multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int32))
        return dict(zip(counts, np.asarray(per_process).sum(axis=0).tolist(), strict=True))

    def local_skipped(self) -> dict[str, int]:
        """This process's skipped-record counts per reason (no communication)."""
        return self.local.skipped()

    def get_state(self) -> np.ndarray:
        """This process's iterator state as uint8 [n] (each process saves its own)."""
        return self.local.get_state()

    def set_state(self, state: np.ndarray) -> None:
        self.local.set_state(state)


def make_local_iterator(
    input_config: Any, process_index: int | None = None, process_count: int | None = None
) -> LocalBatchIterator:
    """Validates config.input and builds this process's numpy batch iterator.

    Process index and count default to jax.process_index() / jax.process_count().
    """
    cfg = (
        input_config
        if isinstance(input_config, InputConfig)
        else validate_input_config(input_config)
    )
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return LocalBatchIterator(cfg, index, count)


def make_global_iterator(
    input_config: Any, mesh: Mesh, data_axis: str | tuple[str, ...] = "data"
) -> GlobalBatchIterator:
    """Validates config.input and builds the iterator of global batches on `mesh`, reading the
    share of jax.process_index() among jax.process_count() processes."""
    cfg = (
        input_config
        if isinstance(input_config, InputConfig)
        else validate_input_config(input_config)
    )
    check_mesh(cfg.batch_size, mesh, data_axis)
    return GlobalBatchIterator(make_local_iterator(cfg), mesh, data_axis)
