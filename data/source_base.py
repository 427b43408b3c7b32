"""What a data source provides to the pipeline, and how sources split work across processes."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import tensorflow as tf

from data.captions import CaptionBank


class Source(abc.ABC):
    """A finite collection of raw records (data/records.py), readable in per-process shards.

    Attributes:
      captions: for label-only sources, the bank the pipeline draws each example's caption from
        (with the example's stateless seed, so captions vary per epoch yet replay exactly);
        None when records carry their own text.
    """

    captions: CaptionBank | None = None

    @abc.abstractmethod
    def records(self, process_index: int, process_count: int, seed: int) -> tf.data.Dataset:
        """One pass over this process's share of the records, in a seed-determined order.

        Shares of different processes are disjoint and together cover the source. Processes must
        pass the same seed: example-level sharding relies on every process seeing the same order.
        """

    def parse(self, raw: dict[str, tf.Tensor] | tf.Tensor) -> dict[str, tf.Tensor]:
        """Turns an element of records() into a raw record; runs after the shuffle, in parallel.

        Sources whose records are cheap to carry undecoded (serialized protos) parse here, so the
        shuffle buffer holds compact bytes and parse failures are counted, not fatal.
        """
        return raw

    def describe(self) -> str:
        """One line for logs."""
        return type(self).__name__

    def num_examples(self) -> int | None:
        """Records in the whole split (all processes), or None when unknown without a full read.

        Lets a trainer turn a length given in epochs into steps.
        """
        return None


def check_process(process_index: int, process_count: int) -> None:
    """Raises ValueError unless 0 <= process_index < process_count."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index}, process_count={process_count}")


def shard_files(files: Sequence[str], process_index: int, process_count: int) -> list[str] | None:
    """Every process_count-th file from process_index, or None when there are too few files.

    Whole files per process mean each process reads only its own bytes; with fewer files than
    processes, callers fall back to example-level sharding (every process reads everything).
    """
    check_process(process_index, process_count)
    if len(files) < process_count:
        return None
    return list(files[process_index::process_count])
