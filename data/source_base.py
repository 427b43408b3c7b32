"""What a data source provides to the pipeline: a table of shards, how to read a group of them,
and how to parse what it read. data/order.py turns that into a replayable order.

A shard is the unit a source is permuted and split in: a TFRecord file, a TFDS file range, or a
single example for sources held in memory or read one file per example (Fashion-MNIST, image
folders). Each epoch the pipeline permutes the shards, reads them `group_size` at a time through
`read`, and shuffles the records in windows; the elements `read` yields are kept compact (bytes
or small arrays) until `parse` turns them into raw records after that shuffle.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from data.captions import CaptionBank
from data.lazy_tf import tf
from data.no_autograph import no_autograph

ShardTable = dict[str, np.ndarray]


class Source(abc.ABC):
    """A finite collection of raw records (data/records.py), readable shard by shard.

    Attributes:
      captions: for label-only sources, the bank the pipeline draws each example's caption from
        (with the example's stateless seed, so captions vary per epoch yet replay exactly);
        None when records carry their own text.
      example_sharded: True when processes always share the source by example: every process
        builds the same stream and keeps its part of each global batch (cheap when shards are
        single examples whose bytes are only read in `parse`). Otherwise processes get whole
        shards when there are at least as many shards as processes.
      group_size: shards read together (interleaved); a resume re-reads at most one group.
    """

    captions: CaptionBank | None = None
    example_sharded: bool = False
    group_size: int = 16

    @abc.abstractmethod
    def shards(self) -> ShardTable:
        """The shard table: named 1-D numpy arrays of equal length, one entry per shard."""

    @abc.abstractmethod
    def read(self, shards: dict[str, tf.Tensor]) -> tf.data.Dataset:
        """The elements of a group of shards (the table's entries for them, as 1-D tensors),
        interleaved deterministically: the same group always yields the same sequence.

        Traced inside tf.data, so it must be graph code.
        """

    def parse(self, element: dict[str, tf.Tensor] | tf.Tensor) -> dict[str, tf.Tensor]:
        """Turns an element of `read` into a raw record; runs after the shuffle, in parallel.

        Sources whose records are cheap to carry undecoded (serialized protos, file names) parse
        here, so the shuffle windows hold compact elements and parse failures are counted, not
        fatal.
        """
        return element

    def describe(self) -> str:
        """One line for logs."""
        return type(self).__name__

    def num_examples(self) -> int | None:
        """Records in the whole split (all processes), or None when unknown without a full read.

        Lets a trainer turn a length given in epochs into steps.
        """
        return None

    def records(self, process_index: int, process_count: int, seed: int = 0) -> tf.data.Dataset:
        """One pass over this process's share, as elements of `read` (what `parse` takes).

        Shares of different processes are disjoint and together cover the source (see
        assign_shards). Shards come in epoch 0's order for `seed`, records unshuffled within
        them. The pipeline's probe reads this.
        """
        share = assign_shards(self, process_index, process_count)
        table = {name: tf.constant(column) for name, column in share.shards.items()}
        order = shard_permutation(share.num_shards, seed, tf.constant(0, tf.int64), shuffle=True)
        group_size = min(self.group_size, share.num_shards)
        groups = tf.data.Dataset.range(-(-share.num_shards // group_size))
        ds = groups.flat_map(
            no_autograph(lambda group: self.read(group_shards(table, order, group, group_size)))
        )
        if share.example_level:
            ds = ds.shard(process_count, process_index)
        return ds


def check_process(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index}, process_count={process_count}")


def table_size(table: ShardTable) -> int:
    """Number of shards in a table; raises ValueError for empty or ragged tables."""
    sizes = {len(column) for column in table.values()}
    if len(sizes) != 1:
        raise ValueError(f"a shard table needs equal-length columns, got sizes {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise ValueError("the source has no shards")
    return size


@dataclasses.dataclass(frozen=True)
class Share:
    """Which shards a process reads.

    Attributes:
      shards: this process's shard table (all shards under example-level sharding).
      example_level: every process reads all shards and keeps its part of the common stream;
        otherwise the shards are this process's alone.
    """

    shards: ShardTable
    example_level: bool

    @property
    def num_shards(self) -> int:
        return table_size(self.shards)


def assign_shards(source: Source, process_index: int, process_count: int) -> Share:
    """Whole shards per process (every process_count-th from process_index) when the source
    shards by file and has at least as many shards as processes; example-level sharding
    otherwise, where every process reads everything.

    Whole shards mean each process reads only its own bytes, but the order then depends on the
    process count; example-level sharding gives the same global order for any process count.
    """
    check_process(process_index, process_count)
    table = source.shards()
    size = table_size(table)
    if source.example_sharded or size < process_count:
        return Share(table, example_level=True)
    mine = {name: column[process_index::process_count] for name, column in table.items()}
    return Share(mine, example_level=False)


# Distinct tags keep the shard and window permutations independent for the same config seed.
SHARD_SEED_TAG = 0x5A4D
WINDOW_SEED_TAG = 0x57D0


def permutation_seed(seed: int, tag: int, *coordinates: tf.Tensor) -> tf.Tensor:
    """int64 [2] stateless seed for (config seed, tag, coordinates...): fold_in, one per value."""
    key = tf.constant([seed, tag], tf.int64)
    for value in coordinates:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64), alg="philox")
    return key


def shard_permutation(num_shards: int, seed: int, epoch: tf.Tensor, shuffle: bool) -> tf.Tensor:
    """int64 [num_shards]: epoch `epoch`'s shard order, a stateless function of (seed, epoch)
    (the identity when not shuffling)."""
    identity = tf.range(num_shards, dtype=tf.int64)
    if not shuffle:
        return identity
    key = permutation_seed(seed, SHARD_SEED_TAG, epoch)
    return tf.random.experimental.stateless_shuffle(identity, seed=key, alg="philox")


def group_shards(
    table: dict[str, tf.Tensor], order: tf.Tensor, group: tf.Tensor, group_size: int
) -> dict[str, tf.Tensor]:
    """The table's entries of shards order[group * group_size : (group + 1) * group_size]."""
    ids = order[group * group_size : (group + 1) * group_size]
    return {name: tf.gather(column, ids) for name, column in table.items()}
