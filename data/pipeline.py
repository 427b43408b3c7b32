"""Per-process input pipelines: replayable order, bad-record accounting, batches, global arrays.

Per process, the tf.data graph is

    ordered_records (data/order.py)     the stream: shards permuted per epoch, read in groups,
                                        shuffled in windows; each record with its stream
                                        position p and coordinates (epoch, group, window, index)
    -> map: parse, caption, check,      stateless seed (stream id, p); a record that fails a
            preprocess (op string)      check gets a reason and skips the op string
    -> ignore_errors                    records whose parsing/preprocessing raised disappear
    -> scan: count checked reasons      per record; then the records that failed a check
    -> filter good                      are dropped
    -> batch(global batch / processes)
    -> scan: count skipped records      per batch: the gaps in this process's record indices
                                        up to the batch's last row, less the checked ones,
                                        are "undecodable"
    -> prefetch

and each batch carries the cumulative skipped-record counts and the coordinates and position of
its last record. Checks that the records' structure already decides are not run per record: when
none can fail (decoded images of static shape, captions from a caption bank vetted once), there
is no check, no branch, and neither the per-record scan nor the filter (data/records.py).

Exact counts at the end. Counts ride on batches, and a record lost to an error leaves no element
behind, so bad records after a pass's last good record would reach no batch. A finite stream
(num_epochs set) therefore ends with an end marker (data/order.py) that skips parsing and
preprocessing, passes the filter and closes the last gap in the counting scan: it becomes the
last row of the last batch, which is removed, or a batch of its own without rows, which the
iterator does not hand out. Once a finite pass is exhausted, skipped() and get_state() hold the
pass's exact counts (GlobalBatchIterator.skipped() sums them over processes). An endless
(training) stream counts every record up to the last one delivered.

Order. The record at each stream position is a pure function of (seed, epoch, position): no
random state lives in tf.data. With example-level sharding (Fashion-MNIST and image folders
always; TFRecord and TFDS sources with fewer shards than processes) every process builds the
same global stream and keeps its rows of each global batch, so on clean data the global batches
are identical for any process count. With file-level sharding (at least as many shards as
processes) each process reads only its own shards and the order depends on the process count.

State. get_state() is a small JSON document in a uint8 array: a layout header (seed, op string,
source, batch size, shuffle buffer, process index and count, order kind), the last returned
record's coordinates and position, and the skipped counts: a few hundred bytes whatever the
shuffle buffer, always under 1 MiB. set_state() rebuilds the stream at that record's epoch and
group, skips to its window (re-reading at most one group of shards: `cycle_length` files of a
TFRecord source, nothing for sources held in memory), re-permutes the window and continues after
the record. Positions, hence augmentation and caption seeds, and the skipped counts continue
exactly: the batches after a restore are those that followed the save. A state saved under
example-level sharding by another process count (the trainer passes process 0's) continues at
the next global-batch boundary after it; under file-level sharding it is refused.

Bad records never stop a run: the checked reasons (data/records.py) and records whose
preprocessing raised ("undecodable": corrupt or truncated images, malformed protos) are dropped and
counted. Before the first batch, a probe reads this process's share until one record survives
preprocessing; a share with none raises NoValidRecordsError with the counts instead of spinning
forever on an infinite repeat of bad records.

Transfer. GlobalBatchIterator can keep upcoming global batches already on their way to the
devices (`device_prefetch`), and with `uint8_images` move images as uint8 and scale them on the
device (data/transfer.py; call `device_preprocess` inside the jitted step).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data.batch_tokenize import record_spec, split_batch_tokenize
from data.config import InputConfig, validate_input_config
from data.lazy_tf import tf
from data.no_autograph import no_autograph
from data.order import (
    COORDS_KEY,
    POSITION_KEY,
    RAW_KEY,
    InputPosition,
    decode_state,
    encode_state,
    is_end_marker,
    make_selection,
    ordered_records,
    resume_position,
)
from data.preprocess import parse_pp
from data.processing import (
    SKIPPED_KEY,
    BatchContractError,
    NoValidRecordsError,
    check_batch_contract,
    check_has_valid_record,
    count_checked,
    count_skipped_fn,
    is_good,
    process_fn,
    stream_id,
)
from data.records import BAD_RECORD_REASONS, CHECKED_REASONS
from data.source_base import assign_shards, check_process
from data.sources import make_source
from data.transfer import DeviceValueRange, split_device_value_range

__all__ = [
    "BatchContractError",
    "GlobalBatchIterator",
    "LocalBatchIterator",
    "NoValidRecordsError",
    "check_mesh",
    "make_global_iterator",
    "make_local_iterator",
    "per_process_batch_size",
]

Batch = dict[str, np.ndarray]


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global / process_count; raises ValueError when it does not divide evenly."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class StreamState:
    """A process's input position after some batch, with its skipped counts per reason."""

    position: InputPosition
    skipped: tuple[int, ...]


class LocalBatchIterator(Iterator[Batch]):
    """Iterates this process's batches as numpy arrays; tracks skipped counts; saves/restores.

    Yields {"image": f32 [b, H, W, 3] (uint8 with `uint8_images` when the op string allows it,
    see data/transfer.py), "text": i32 [b, L], optional "label": i32 [b], ...} with
    b = global batch size / process count.

    Raises BatchContractError when the op string's output does not fit the contract, and
    NoValidRecordsError when this process's share has no usable record.

    `checks_records` is False when no record check can fail for this source and op string, so
    that the pipeline runs none (see the module doc).
    """

    def __init__(
        self,
        cfg: InputConfig,
        process_index: int = 0,
        process_count: int = 1,
        *,
        uint8_images: bool = False,
    ) -> None:
        check_process(process_index, process_count)
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        self.batch_size = per_process_batch_size(cfg.batch_size, process_count)
        self.source = make_source(cfg.source_name, **cfg.source_options)
        self.share = assign_shards(self.source, process_index, process_count)
        self.selection = make_selection(self.share, cfg.batch_size, process_index, process_count)
        self.global_order = self.share.example_level or process_count == 1
        self.pp_fn = parse_pp(cfg.pp)
        self.device_value_range: DeviceValueRange | None = None
        if uint8_images:
            self.pp_fn, self.device_value_range = split_device_value_range(self.pp_fn)
        # Tokenize ops that can run on whole batches do, once per batch (data/batch_tokenize.py).
        self.pp_fn, self.batch_pp_fn = split_batch_tokenize(self.pp_fn)
        # Processes sharing one stream share its seeds, so an example's augmentations do not
        # depend on the process that reads it.
        self.stream = stream_id(cfg.seed, 0 if self.global_order else process_index)
        self._restart(InputPosition(), [0] * len(BAD_RECORD_REASONS), probe=True)

    def device_preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Completes a batch on the device (inside the jitted step): scales uint8 images to the
        op string's value range; the identity when images arrive as float32."""
        if self.device_value_range is None:
            return batch
        return self.device_value_range(batch)

    def _dataset(self, start: InputPosition, skipped: list[int], probe: bool) -> tf.data.Dataset:
        cfg = self.cfg
        records = ordered_records(
            self.source,
            self.share,
            self.selection,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            num_epochs=cfg.num_epochs,
            start=start,
        )
        processing = process_fn(
            self.source, cfg, self.stream, self.pp_fn, records.element_spec[RAW_KEY]
        )
        out_spec = processing.out_spec
        self.checks_records = processing.may_fail_checks
        # Contract first (from traced shapes, no data read), then the probe (reads data).
        uint8 = self.device_value_range is not None
        check_batch_contract(
            record_spec(self.batch_pp_fn, out_spec), tf.uint8 if uint8 else tf.float32
        )
        if probe:
            self._probe(processing.fn)
        parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
        ds = records.map(no_autograph(processing.fn), **parallel).ignore_errors()
        if processing.may_fail_checks:
            checked = [*skipped[: len(CHECKED_REASONS)], 0]
            ds = ds.scan(tf.constant(checked, tf.int64), no_autograph(count_checked))
            ds = ds.filter(no_autograph(is_good))
        # Training repeats forever and needs fixed shapes; a finite pass (evaluation) keeps the
        # last, short batch, which evaluators pad and mask.
        finite = cfg.num_epochs is not None
        ds = ds.batch(self.batch_size, drop_remainder=not finite)
        first_index = self.selection.kept_before(tf.constant(start.next_position, tf.int64))
        initial = (first_index - 1, tf.constant(sum(skipped), tf.int64))
        ds = ds.scan(initial, no_autograph(count_skipped_fn(self.selection, finite=finite)))

        def close_batch(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            # Coordinates increase, so the last row speaks for the batch, the end marker's
            # included (the counting scan has put the counts after that row in SKIPPED_KEY).
            features = {k: batch[k] for k in out_spec}
            last_coords = batch[COORDS_KEY][-1]
            if finite:  # the end marker is the stream's last element: drop its row
                rows = tf.shape(batch[COORDS_KEY])[0]
                rows -= tf.cast(is_end_marker(last_coords), tf.int32)
                features = {k: v[:rows] for k, v in features.items()}
            if self.batch_pp_fn is not None:
                features = self.batch_pp_fn(features)
            return {
                **features,
                SKIPPED_KEY: batch[SKIPPED_KEY],
                COORDS_KEY: last_coords,
                POSITION_KEY: batch[POSITION_KEY][-1],
            }

        ds = ds.map(no_autograph(close_batch))
        if cfg.prefetch:
            ds = ds.prefetch(cfg.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        if finite:
            # An evaluation pass keeps its iterator between passes, and destroying it (at the
            # next rewind) waits for tf.data's autotuning thread, which on a CPU busy training
            # took 20-50 s instead of none. Without autotuning, AUTOTUNE means one call per core.
            options.autotune.enabled = False
        return ds.with_options(options)

    def _probe(self, process: Callable[[dict[str, Any]], dict[str, tf.Tensor]]) -> None:
        one_pass = self.source.records(self.process_index, self.process_count, self.cfg.seed)
        stream = one_pass.enumerate().map(
            no_autograph(
                lambda position, element: process(
                    {
                        RAW_KEY: element,
                        POSITION_KEY: position,
                        COORDS_KEY: tf.zeros([4], tf.int64),
                    }
                )
            )
        )
        check_has_valid_record(
            stream,
            f"process {self.process_index}/{self.process_count}: no valid record in "
            f"{self.source.describe()}",
        )

    def _restart(self, start: InputPosition, skipped: list[int], probe: bool = False) -> None:
        self.dataset = self._dataset(start, skipped, probe)
        self._dataset_start = StreamState(start, tuple(skipped))
        self._iterator = iter(self.dataset)
        self._state = self._dataset_start

    def rewind(self) -> None:
        """Goes back to the start of the input (the first batch of its first epoch), as a newly
        built iterator would be, with zero skipped counts.

        An evaluation reads its split once per evaluation: rewinding reuses the pipeline built
        for the first pass instead of tracing the op string and probing the records again
        (a second or two each time)."""
        start = StreamState(InputPosition(), (0,) * len(BAD_RECORD_REASONS))
        if self._dataset_start != start:  # built to resume elsewhere (set_state)
            self._restart(start.position, list(start.skipped))
            return
        self._iterator = iter(self.dataset)
        self._state = start

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        position = InputPosition.after(batch.pop(COORDS_KEY).numpy(), int(batch.pop(POSITION_KEY)))
        self._state = StreamState(position, tuple(batch.pop(SKIPPED_KEY).numpy().tolist()))
        if batch["image"].shape[0] == 0:  # only the end marker: final counts, no rows
            raise StopIteration
        return {k: v.numpy() for k, v in batch.items()}

    def skipped(self) -> dict[str, int]:
        """Records skipped so far by this process, per reason (for logging as metrics): up to
        the last record of the last batch returned, and every record of a finite pass once it
        is exhausted."""
        return dict(zip(BAD_RECORD_REASONS, self._state.skipped, strict=True))

    def stream_state(self) -> StreamState:
        """The position and counts after the last batch returned (cheap; no serialization)."""
        return self._state

    def _layout(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "order": "global" if self.global_order else "per_process",
            "process_index": self.process_index,
            "process_count": self.process_count,
            "config": {
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "pp": cfg.pp,
                "source": repr(sorted(cfg.source.items())),
                "shuffle_buffer": cfg.shuffle_buffer,
            },
        }

    def encode(self, state: StreamState) -> np.ndarray:
        """uint8 [n]: `state` serialized with this pipeline's layout header."""
        return encode_state(self._layout(), state.position, list(state.skipped))

    def get_state(self) -> np.ndarray:
        """uint8 [n] (a few hundred bytes): the position after the last batch returned, for a
        train-state checkpoint."""
        return self.encode(self._state)

    def set_state(self, state: np.ndarray) -> None:
        """Restores a get_state() output: the next batch is the one that followed it.

        The state must come from the same input config (seed, op string, source, batch size,
        shuffle buffer). From the same process index and count, resume is exact. Under
        example-level sharding, a state of another process (e.g. process 0 of a run with another
        process count) continues at the next global-batch boundary after its position. Raises
        ValueError for states that cannot be continued here, saying why.
        """
        saved_layout, position, skipped = decode_state(state)
        position, skipped = resume_position(
            saved_layout, position, skipped, self._layout(), self.cfg.batch_size
        )
        self._restart(position, skipped)


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

    Yields {"image": f32 [B, H, W, 3] (uint8 when the local iterator sends uint8 images: pass
    each batch through `device_preprocess` in the jitted step), "text": i32 [B, L], optional
    "label": i32 [B]} with B the global batch size; process i supplies rows [i * b, (i + 1) * b)
    of its addressable shards.

    With `device_prefetch` = k > 0, k upcoming batches are already on their way to the devices
    when a batch is returned (transfers are asynchronous). get_state() and skipped() always
    describe the batches returned so far, not the prefetched ones, and once a finite pass is
    exhausted, the whole pass.
    """

    def __init__(
        self,
        local: LocalBatchIterator,
        mesh: Mesh,
        data_axis: str | tuple[str, ...] = "data",
        *,
        device_prefetch: int = 0,
    ) -> None:
        check_mesh(local.cfg.batch_size, mesh, data_axis)
        if device_prefetch < 0:
            raise ValueError(f"device_prefetch must be >= 0, got {device_prefetch}")
        self.local = local
        self.sharding = NamedSharding(mesh, PartitionSpec(data_axis))
        self.device_prefetch = device_prefetch
        self.device_preprocess = local.device_preprocess
        self._ahead: collections.deque[tuple[dict[str, jax.Array], StreamState]] = (
            collections.deque()
        )
        self._returned = local.stream_state()

    def _transfer_next(self) -> bool:
        """Starts moving the next local batch to the devices; False when the input has ended."""
        try:
            batch = next(self.local)
        except StopIteration:
            return False
        arrays = {
            key: jax.make_array_from_process_local_data(
                self.sharding, value, (value.shape[0] * self.local.process_count, *value.shape[1:])
            )
            for key, value in batch.items()
        }
        self._ahead.append((arrays, self.local.stream_state()))
        return True

    def __next__(self) -> dict[str, jax.Array]:
        if not self._ahead and not self._transfer_next():
            # Exhausted: the local iterator now holds the pass's final counts.
            self._returned = self.local.stream_state()
            raise StopIteration
        batch, self._returned = self._ahead.popleft()
        while len(self._ahead) < self.device_prefetch and self._transfer_next():
            pass
        return batch

    def skipped(self) -> dict[str, int]:
        """Skipped-record counts per reason, summed over all processes.

        With several processes this is a collective (an all-gather of a few integers): every
        process must call it at the same point, as the trainer does at its logging steps.
        """
        counts = self.local_skipped()
        if self.local.process_count == 1:
            return counts
        per_process = multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int32))
        return dict(zip(counts, np.asarray(per_process).sum(axis=0).tolist(), strict=True))

    def local_skipped(self) -> dict[str, int]:
        """This process's skipped-record counts per reason (no communication)."""
        return dict(zip(BAD_RECORD_REASONS, self._returned.skipped, strict=True))

    def get_state(self) -> np.ndarray:
        """This process's input position as uint8 [n] (each process saves its own)."""
        return self.local.encode(self._returned)

    def set_state(self, state: np.ndarray) -> None:
        """Restores a get_state() output (see LocalBatchIterator.set_state); drops the batches
        prefetched so far."""
        self._ahead.clear()
        self.local.set_state(state)
        self._returned = self.local.stream_state()


def _input_config(input_config: Any) -> InputConfig:
    if isinstance(input_config, InputConfig):
        return input_config
    return validate_input_config(input_config)


def make_local_iterator(
    input_config: Any,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    uint8_images: bool = False,
) -> LocalBatchIterator:
    """Validates config.input and builds this process's numpy batch iterator.

    Process index and count default to jax.process_index() / jax.process_count().
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return LocalBatchIterator(_input_config(input_config), index, count, uint8_images=uint8_images)


def make_global_iterator(
    input_config: Any,
    mesh: Mesh,
    data_axis: str | tuple[str, ...] = "data",
    *,
    uint8_images: bool = False,
    device_prefetch: int = 0,
) -> GlobalBatchIterator:
    """Validates config.input and builds the iterator of global batches on `mesh`, reading the
    share of jax.process_index() among jax.process_count() processes.

    uint8_images: send images as uint8 when the op string ends its image ops with
      value_range(vmin, vmax) from 0..255 (data/transfer.py); the trainer then applies
      `iterator.device_preprocess` to each batch inside its jitted step.
    device_prefetch: global batches kept in flight to the devices ahead of the one returned.
    """
    cfg = _input_config(input_config)
    check_mesh(cfg.batch_size, mesh, data_axis)
    local = make_local_iterator(cfg, uint8_images=uint8_images)
    return GlobalBatchIterator(local, mesh, data_axis, device_prefetch=device_prefetch)
