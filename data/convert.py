"""Image-caption rows (data/pair_readers.py) -> checked, optionally downsized images -> shards.

Every image is decoded once (Pillow) before it is stored, so a missing or corrupt file is
skipped and counted here instead of at training time. An image whose longer side exceeds
`max_side` is resized (aspect ratio kept) and re-encoded as JPEG; any other image is stored byte
for byte, unless tf.io.decode_image cannot read its format (TIFF, ...), in which case it is
re-encoded as JPEG at its own size. EXIF orientation is left alone, as the training pipeline's
decoder leaves it.

Loading and checking run on a thread pool (file reads and Pillow's decoders release the GIL);
results are written in input order, round-robin over the shards, so the output does not depend
on the number of threads. Shards are published whole (data/tfrecords.py: ShardWriter).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from data.lazy_tf import tf
from data.pair_readers import Row, RowError, Skip, clean_caption
from data.tfrecords import ShardWriter, encode_example

# What tf.io.decode_image reads (Pillow's names; MPO is a camera JPEG with extra frames).
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
EXAMPLES_PER_REASON = 3


def fit_within(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """(width, height) scaled so the longer side is max_side; None if it already fits."""
    longer = max(width, height)
    if max_side is None or longer <= max_side:
        return None
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, max_side: int | None = None, quality: int = 95) -> tuple[bytes, str]:
    """Encoded image -> (bytes to store, "kept" | "resized" | "reencoded").

    Raises RowError("undecodable_image") when the bytes do not decode completely.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = fit_within(*image.size, max_side)
            if target is None and image.format in DECODABLE_FORMATS:
                # JPEGs are checked at 1/8 scale: every coefficient is still entropy-decoded
                # (so damage is found), only the inverse DCT work shrinks.
                image.draft(None, (1, 1))
                image.load()
                return data, "kept"
            if target is not None:
                image.draft(None, target)  # JPEG: decode at the smallest scale >= target
            converted = image.convert("L" if image.mode == "L" else "RGB")
            if target is not None:
                converted = converted.resize(target, Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            converted.save(buffer, format="JPEG", quality=quality)
            return buffer.getvalue(), "reencoded" if target is None else "resized"
    # Damaged files make Pillow raise many types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError); all of them mean this one image is unusable.
    except Exception as error:
        if isinstance(error, UnidentifiedImageError):
            raise RowError("undecodable_image", "not an image format Pillow knows") from error
        raise RowError("undecodable_image", f"{type(error).__name__}: {error}") from error


def _read_file(path: str, missing: str, unreadable: str) -> bytes:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError as error:
        raise RowError(missing, path) from error
    except (OSError, tf.errors.OpError) as error:
        raise RowError(unreadable, str(error)) from error


def prepare_row(
    row: Row, max_side: int | None = None, quality: int = 95
) -> tuple[bytes, str] | Skip:
    """Row -> (serialized tf.train.Example, what prepare_image did), or the Skip saying why not."""
    try:
        if row.caption_file is not None:
            raw = _read_file(row.caption_file, "missing_field", "missing_field")
        else:
            raw = row.caption
        caption = clean_caption(raw)
        if isinstance(row.image, bytes):
            data = row.image
        else:
            data = _read_file(row.image, "missing_image", "unreadable_image")
        image, action = prepare_image(data, max_side, quality)
        return encode_example(image, caption), action
    except RowError as error:
        return Skip(row.location, error.reason, error.detail)


@dataclass
class ConversionReport:
    """What convert did; skip_examples holds the first locations skipped for each reason."""

    paths: list[str]
    records_per_shard: list[int] = field(default_factory=list)
    rows_read: int = 0
    written: int = 0
    resized: int = 0
    reencoded: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        examples = self.skip_examples.setdefault(skip.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{skip.location} ({skip.detail})" if skip.detail else skip.location)


def _in_order(
    rows: Iterable[Row | Skip], prepare: Callable[[Row], tuple[bytes, str] | Skip], workers: int
) -> Iterator[tuple[bytes, str] | Skip]:
    """prepare(row) for every Row on `workers` threads, results in input order; Skips pass.

    At most 4 * workers rows are in flight, so memory stays bounded on any input size.
    """
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="convert")
    pending: collections.deque[Future | Skip] = collections.deque()
    try:
        for row in rows:
            pending.append(pool.submit(prepare, row) if isinstance(row, Row) else row)
            if len(pending) >= 4 * max(1, workers):
                head = pending.popleft()
                yield head.result() if isinstance(head, Future) else head
        while pending:
            head = pending.popleft()
            yield head.result() if isinstance(head, Future) else head
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def convert(
    rows: Iterable[Row | Skip],
    output_prefix: str,
    num_shards: int,
    *,
    max_side: int | None = None,
    quality: int = 95,
    workers: int = 4,
    on_row: Callable[[ConversionReport], None] | None = None,
    on_skip: Callable[[Skip], None] | None = None,
) -> ConversionReport:
    """Writes the usable rows into PREFIX-0000i-of-0000N.tfrecord; counts the rest.

    on_row(report) runs after every row (progress display); on_skip(skip) for every skip.
    Nothing is published when no row is usable. An exception (a failed write, an InputError
    from a reader) leaves no final-named shard behind.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    prepare = functools.partial(prepare_row, max_side=max_side, quality=quality)
    results = _in_order(rows, prepare, workers)
    # closing(): on an exception the worker threads stop now, not when the traceback is freed.
    with ShardWriter(output_prefix, num_shards) as writer, contextlib.closing(results):
        report = ConversionReport(paths=list(writer.paths))
        for result in results:
            report.rows_read += 1
            if isinstance(result, Skip):
                report.add_skip(result)
                if on_skip is not None:
                    on_skip(result)
            else:
                serialized, action = result
                writer.write(serialized)
                report.written += 1
                report.resized += action == "resized"
                report.reencoded += action == "reencoded"
            if on_row is not None:
                on_row(report)
        if report.written == 0:
            writer.discard()
        report.records_per_shard = list(writer.records_per_shard)
    return report


@dataclass
class WriteStats:
    """What write_shards did: files written, records per file, and the image paths skipped."""

    paths: list[str] = field(default_factory=list)
    records_per_shard: list[int] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)


def write_shards(
    pairs: Iterable[tuple[str, str]], output_prefix: str, num_shards: int
) -> WriteStats:
    """Writes (image path, caption) pairs round-robin into num_shards TFRecord files.

    The image files' bytes are stored unchanged. Pairs whose image is missing or does not decode
    (or whose caption is empty) are skipped and listed rather than aborting a long conversion.
    """
    skipped: list[str] = []
    report = convert(
        (Row(image, image, caption) for image, caption in pairs),
        str(output_prefix),
        num_shards,
        on_skip=lambda skip: skipped.append(skip.location),
    )
    return WriteStats(report.paths, report.records_per_shard, skipped)
