"""The replayable input order: which record comes at each stream position, as a pure function of
(seed, epoch, position), and the small state that resumes it exactly.

Per epoch e, a process's shards (data/source_base.py) are permuted by a stateless function of
(seed, e) and read `group_size` at a time (group g), interleaved deterministically. Each group's
records are cut into windows of `shuffle_buffer` records (window k; windows restart at group
starts) and each window is permuted by a stateless function of (seed, e, g, k). The permuted
windows, one after the other, are the stream; stream positions count its records from 0 over all
epochs. Every record carries its position and its coordinates (e, g, k, i), i its index in the
permuted window.

Resume. A record's coordinates and position are all it takes to rebuild the stream after it:
start at epoch e, group g, skip k windows' worth of the group's records, permute window k and
drop its records up to i. Re-reading is bounded by one group (`group_size` shards, the records
before window k), never the stream so far. With shuffle_buffer <= 1 nothing is permuted
(shards in their table order, windows of UNSHUFFLED_WINDOW records kept in order).

Example-level sharding. When every process reads all shards (data/source_base.assign_shards),
all processes build the same stream and each keeps the records whose position falls in its block
of each global batch: process p of n keeps positions [p * b, (p + 1) * b) modulo B, B the global
batch and b = B / n. On clean data, rows [p * b, (p + 1) * b) of every global batch are thus the
same for any process count. The selection runs on whole windows, before any record is parsed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from data.lazy_tf import tf
from data.no_autograph import no_autograph
from data.source_base import (
    WINDOW_SEED_TAG,
    Share,
    Source,
    group_shards,
    permutation_seed,
    shard_permutation,
)

RAW_KEY = "_raw"
POSITION_KEY = "_position"
COORDS_KEY = "_coords"  # int64 [4]: epoch, group, window, index in window
# The window index of the end marker, which no record has.
END_INDEX = -1
UNSHUFFLED_WINDOW = 256
STATE_VERSION = 2
# Training repeats "forever": epochs up to this bound (a Dataset.range needs an end).
EPOCH_LIMIT = 2**62


@dataclasses.dataclass(frozen=True)
class InputPosition:
    """Where a process's stream stands: the last record delivered (its coordinates and stream
    position) and the first stream position still to deliver.

    The default is the start of the stream: an anchor "before" window 0 of group 0 of epoch 0.
    """

    epoch: int = 0
    group: int = 0
    window: int = 0
    index: int = -1
    position: int = -1
    next_position: int = 0

    @classmethod
    def after(cls, coords: np.ndarray, position: int) -> InputPosition:
        """The position right after the record with these coordinates and stream position."""
        epoch, group, window, index = (int(c) for c in coords)
        return cls(epoch, group, window, index, int(position), int(position) + 1)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The stream positions a process keeps: `block` consecutive ones of every `period`, from
    `offset` on. Selection(1, 1, 0) keeps everything."""

    block: int = 1
    period: int = 1
    offset: int = 0

    def mask(self, positions: tf.Tensor) -> tf.Tensor:
        """bool [n] for int64 [n] positions."""
        rest = positions % self.period - self.offset
        return tf.logical_and(rest >= 0, rest < self.block)

    def kept_before(self, positions: tf.Tensor) -> tf.Tensor:
        """Number of kept positions below each of int64 [...] `positions`. For a kept position,
        its index in this process's share of the stream; gaps in it are records lost to errors."""
        rest = tf.clip_by_value(positions % self.period - self.offset, 0, self.block)
        return positions // self.period * self.block + rest


def is_end_marker(coords: tf.Tensor) -> tf.Tensor:
    """bool [...] for int64 [..., 4] coordinates: the end marker of a finite stream."""
    return tf.equal(coords[..., 3], END_INDEX)


def placeholder(spec: tf.TensorSpec) -> tf.Tensor:
    """A value of `spec` (unknown dimensions as 0) standing in for a record that is not there."""
    shape = [0 if d is None else d for d in spec.shape.as_list()]
    if spec.dtype == tf.string:
        return tf.fill(shape, "")
    return tf.zeros(shape, spec.dtype)


def make_selection(
    share: Share, batch_size: int, process_index: int, process_count: int
) -> Selection:
    """This process's rows of each global batch under example-level sharding, else everything."""
    if not share.example_level:
        return Selection()
    block = batch_size // process_count
    return Selection(block, batch_size, process_index * block)


def ordered_records(
    source: Source,
    share: Share,
    selection: Selection,
    *,
    seed: int,
    shuffle_buffer: int,
    num_epochs: int | None,
    start: InputPosition = InputPosition(),
) -> tf.data.Dataset:
    """This process's stream from `start` on: {RAW_KEY: element of source.read, POSITION_KEY:
    int64 [], COORDS_KEY: int64 [4]}, the records `selection` keeps at positions >=
    start.next_position.

    A finite stream (`num_epochs` set) ends with an end marker (is_end_marker): a placeholder
    element with coordinates (num_epochs, 0, 0, END_INDEX) and position T - 1, T the stream's
    length, so that InputPosition.after() makes it the start of epoch `num_epochs`. It tells the
    counting scan where the stream ends, hence how many records at its end were lost to errors,
    which no later record could show. Every process gets one, whatever its selection.

    Memory: about two windows of raw elements (the one being consumed and the next, prepared
    ahead so that a window boundary does not stall the pipeline).
    """
    shuffle = shuffle_buffer > 1
    window_size = shuffle_buffer if shuffle else UNSHUFFLED_WINDOW
    num_shards = share.num_shards
    group_size = min(source.group_size, num_shards)
    num_groups = -(-num_shards // group_size)
    table = {name: tf.constant(column) for name, column in share.shards.items()}
    end_epoch = EPOCH_LIMIT if num_epochs is None else num_epochs

    def groups_of(epoch: tf.Tensor) -> tf.data.Dataset:
        first = tf.where(epoch == start.epoch, tf.constant(start.group, tf.int64), 0)
        return tf.data.Dataset.range(first, num_groups).map(lambda group: (epoch, group))

    def windows_of(epoch: tf.Tensor, group: tf.Tensor) -> tf.data.Dataset:
        at_start = tf.logical_and(epoch == start.epoch, group == start.group)
        first_window = tf.where(at_start, tf.constant(start.window, tf.int64), 0)
        order = shard_permutation(num_shards, seed, epoch, shuffle)
        elements = source.read(group_shards(table, order, group, group_size))
        windows = elements.skip(first_window * window_size).batch(window_size)
        return windows.enumerate(start=first_window).map(
            lambda window, records: (tf.stack([epoch, group, window]), records)
        )

    def assign_positions(first: tf.Tensor, item: Any) -> tuple[tf.Tensor, Any]:
        coords, records = item
        size = tf.shape(tf.nest.flatten(records)[0], out_type=tf.int64)[0]
        return first + size, (first, coords, records)

    def arrange(first: tf.Tensor, coords: tf.Tensor, records: Any) -> dict[str, Any]:
        size = tf.shape(tf.nest.flatten(records)[0], out_type=tf.int64)[0]
        index = tf.range(size, dtype=tf.int64)
        if shuffle:
            key = permutation_seed(seed, WINDOW_SEED_TAG, coords[0], coords[1], coords[2])
            permutation = tf.random.experimental.stateless_shuffle(index, seed=key, alg="philox")
            records = tf.nest.map_structure(lambda x: tf.gather(x, permutation), records)
        positions = first + index
        keep = tf.logical_and(positions >= start.next_position, selection.mask(positions))
        if num_epochs is not None:
            # Only the end marker's window lies past the last epoch. Its position never falls
            # before the start (a state of a longer pass restored into a shorter one).
            is_end = coords[0] >= end_epoch
            index = tf.where(is_end, tf.constant([END_INDEX], tf.int64), index)
            end_position = tf.maximum(first, start.next_position) - 1
            positions = tf.where(is_end, end_position[None], positions)
            keep = tf.logical_or(keep, is_end)
        all_coords = tf.concat([tf.tile(coords[None], [size, 1]), index[:, None]], axis=1)
        return {
            RAW_KEY: tf.nest.map_structure(lambda x: tf.boolean_mask(x, keep), records),
            POSITION_KEY: tf.boolean_mask(positions, keep),
            COORDS_KEY: tf.boolean_mask(all_coords, keep),
        }

    windows = tf.data.Dataset.range(start.epoch, end_epoch).flat_map(no_autograph(groups_of))
    windows = windows.flat_map(no_autograph(windows_of))
    if num_epochs is not None:
        coords_spec, records_spec = windows.element_spec
        one_placeholder = tf.nest.map_structure(
            lambda spec: placeholder(tf.TensorSpec([1, *spec.shape[1:]], spec.dtype)),
            records_spec,
        )
        end = tf.constant([end_epoch, 0, 0], coords_spec.dtype)
        windows = windows.concatenate(tf.data.Dataset.from_tensors((end, one_placeholder)))
    windows = (
        # Window k of the start group begins `index` records before the anchor record.
        windows.scan(
            tf.constant(start.position - start.index, tf.int64), no_autograph(assign_positions)
        )
        .map(no_autograph(arrange))
        .prefetch(1)
    )
    return windows.unbatch()


def encode_state(layout: dict[str, Any], position: InputPosition, skipped: list[int]) -> np.ndarray:
    """uint8 [n]: JSON of the layout header, the position and the skipped-record counts."""
    state = {
        "version": STATE_VERSION,
        "layout": layout,
        "position": dataclasses.asdict(position),
        "skipped": [int(c) for c in skipped],
    }
    return np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8).copy()


def decode_state(state: np.ndarray) -> tuple[dict[str, Any], InputPosition, list[int]]:
    """encode_state's inverse; ValueError for anything else (e.g. a state of an older version)."""
    try:
        decoded = json.loads(np.asarray(state, np.uint8).tobytes())
        version = decoded.get("version")
    except (ValueError, AttributeError):
        raise ValueError(
            "input state is not a state written by this pipeline (checkpoints of earlier versions "
            "hold a tf.data iterator checkpoint, which cannot be converted: restore without the "
            "input state to start the input from its beginning)"
        ) from None
    if version != STATE_VERSION:
        raise ValueError(f"input state version {version}, expected {STATE_VERSION}")
    return decoded["layout"], InputPosition(**decoded["position"]), decoded["skipped"]


def resume_position(
    saved_layout: dict[str, Any],
    position: InputPosition,
    skipped: list[int],
    layout: dict[str, Any],
    batch_size: int,
) -> tuple[InputPosition, list[int]]:
    """Where a pipeline with `layout` continues from a state saved with `saved_layout`, and its
    skipped counts.

    Layouts carry "order" ("global" when every process builds the same stream, i.e. example-level
    sharding or a single process; "per_process" when each process reads its own shards),
    "process_index", "process_count" and "config" (what the order depends on), which must match.
    The same process continues right after its saved record. A global-order state from another
    process (the trainer passes process 0's when the process count changed) continues at the
    next global-batch boundary after it, which on clean data is where the saving run would
    have continued; process 0 then takes over the saved skipped counts, the others start at 0.
    """
    if saved_layout.get("config") != layout["config"]:
        differing = sorted(
            key
            for key in {*saved_layout.get("config", {}), *layout["config"]}
            if saved_layout.get("config", {}).get(key) != layout["config"].get(key)
        )
        raise ValueError(
            f"input state was saved with other {', '.join(differing)}: "
            f"{ {k: saved_layout.get('config', {}).get(k) for k in differing} }, this pipeline has "
            f"{ {k: layout['config'].get(k) for k in differing} }"
        )
    place = ("process_index", "process_count", "order")
    if all(saved_layout[key] == layout[key] for key in place):
        return position, skipped
    if saved_layout["order"] == layout["order"] == "global":
        boundary = -(-position.next_position // batch_size) * batch_size
        resumed = dataclasses.replace(position, next_position=boundary)
        counts = skipped if layout["process_index"] == 0 else [0] * len(skipped)
        return resumed, counts
    raise ValueError(
        f"input state was saved by process {saved_layout['process_index']} of "
        f"{saved_layout['process_count']} ({saved_layout['order']} order), this is process "
        f"{layout['process_index']} of {layout['process_count']} ({layout['order']} order). "
        "With file-level sharding (at least as many shards as processes) each process reads its "
        "own shards, so a position does not carry over to another process count: resume with "
        f"{saved_layout['process_count']} processes, or start the input from its beginning by "
        "not restoring the input state"
    )
