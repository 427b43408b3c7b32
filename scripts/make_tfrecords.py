"""Converts image-caption pairs (manifest, image folder or WebDataset tars) into TFRecord shards.

    python -m scripts.make_tfrecords --input pairs.csv --output out/pairs --num_shards 8
    python -m scripts.make_tfrecords --input photos/ --output out/pairs --max_side 512
    python -m scripts.make_tfrecords --input 'shards/{00000..00009}.tar' --output out/pairs

writes out/pairs-00000-of-00008.tfrecord ... with features {image: encoded bytes, caption:
UTF-8}, which config.input.source = dict(name="tfrecord", files="out/pairs-*.tfrecord") reads.

Inputs (format from the extension, a folder, or --format):
  .csv / .tsv  a header row, then one pair per row; --image_column / --caption_column name the
               columns (default image, caption); relative image paths are relative to the file
  .jsonl       one JSON object per line, with the same two keys
  folder       every .jpg .jpeg .png .webp .gif .bmp under it (any depth) with its caption in
               a .txt file of the same stem beside it: a/001.jpg + a/001.txt
  .tar .tar.gz WebDataset shards (img2dataset, open_clip): files, globs, brace ranges such as
               'shards/{00000..00099}.tar' (quote them), several joined with '::'. Members are
               grouped by key (the path up to the first dot of the file name); image from the
               jpg/jpeg/png/webp member, caption from the txt member, else from the json
               member's --caption_column, "caption" or "text" field.

Images are stored byte for byte, except those whose longer side exceeds --max_side (resized,
aspect kept) and formats tf.io.decode_image cannot read (TIFF, ...): those become JPEGs.

No bad row stops the conversion: rows with a missing field, empty caption, malformed JSON,
bytes that are not UTF-8, a wrong number of CSV fields, or a missing or undecodable image (each
image is decoded once to check) are skipped, counted per reason with the first locations
(file:line or tar:member), and summarised at the end. The exit status is 1 only when no row is
usable. Shards are written as NAME.tmp-PID and renamed when all are complete, so an
interrupted run never leaves a partial shard under a name a training glob reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

from scripts import terminal
from scripts.terminal import positive_int

if TYPE_CHECKING:  # the module imports TensorFlow, which must wait until after parsing
    from data.convert import ConversionReport


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [1, 100], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_tfrecords",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", required=True, nargs="+", help="manifest(s), folder(s) or tar shards"
    )
    parser.add_argument("--output", required=True, help="output prefix, e.g. out/pairs")
    parser.add_argument("--num_shards", type=positive_int, default=1)
    parser.add_argument(
        "--format",
        choices=["csv", "tsv", "jsonl", "folder", "webdataset"],
        help="input format when the extension does not tell",
    )
    parser.add_argument("--image_column", default="image", help="csv/tsv column, jsonl key")
    parser.add_argument(
        "--caption_column", default="caption", help="csv/tsv column, jsonl key, tar json field"
    )
    parser.add_argument(
        "--max_side",
        type=positive_int,
        help="resize images whose longer side exceeds this (aspect kept) and store them as "
        "JPEG; smaller images are stored byte for byte",
    )
    parser.add_argument("--jpeg_quality", type=_quality, default=95, help="for re-encoded images")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        help="threads reading and checking images (default: CPU cores, at most 8)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument(
        "--progress_every",
        type=positive_int,
        default=10_000,
        help="rows between progress lines when stderr is not a terminal",
    )
    terminal.add_verbose_flag(parser)
    return parser


class Progress:
    """rows read / written / skipped and the rate, on one line: rewritten in place on a
    terminal (at most 5 times a second), one line every `every` rows in a log."""

    def __init__(self, stream: TextIO, every: int, enabled: bool = True, clock=time.monotonic):
        self.stream, self.every, self.enabled, self.clock = stream, max(1, every), enabled, clock
        self.in_place = enabled and getattr(stream, "isatty", lambda: False)()
        self.start = clock()
        self.last_draw = float("-inf")
        self.last_rows = -1

    def update(self, report: ConversionReport) -> None:
        if not self.enabled:
            return
        if self.in_place:
            if self.clock() - self.last_draw >= 0.2:
                self._draw(report)
        elif report.rows_read % self.every == 0:
            self._draw(report)

    def finish(self, report: ConversionReport) -> None:
        if self.enabled and report.rows_read != self.last_rows:
            self._draw(report)
        if self.in_place and self.last_rows >= 0:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, report: ConversionReport) -> None:
        elapsed = max(self.clock() - self.start, 1e-9)
        line = (
            f"{report.rows_read:,} rows read, {report.written:,} written, "
            f"{report.num_skipped:,} skipped ({report.rows_read / elapsed:,.1f} rows/s)"
        )
        # \r and erase-to-end-of-line redraw the line in place on a terminal.
        self.stream.write(f"\r{line}\x1b[K" if self.in_place else f"{line}\n")
        self.stream.flush()
        self.last_draw, self.last_rows = self.clock(), report.rows_read


def print_skips(report: ConversionReport, stream: TextIO) -> None:
    """Per reason: how many rows, what it means, and the first locations."""
    from data.pair_readers import SKIP_REASONS

    if not report.num_skipped:
        return
    print(f"skipped {report.num_skipped:,} of {report.rows_read:,} rows:", file=stream)
    for reason, count in report.skipped.most_common():
        examples = "; ".join(report.skip_examples[reason])
        print(f"  {reason}: {count:,} ({SKIP_REASONS[reason]}), e.g. {examples}", file=stream)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminal.quiet_libraries(args.verbose)
    # Imported after parsing: --help stays fast and the logging settings above apply.
    import tensorflow as tf

    from data.convert import convert
    from data.pair_readers import InputError, plan_inputs, read_pairs

    inputs = " ".join(args.input)
    progress = Progress(sys.stderr, args.progress_every, enabled=not args.quiet)
    try:
        plan = plan_inputs(args.input, args.format)
        report = convert(
            read_pairs(plan, args.image_column, args.caption_column),
            args.output,
            args.num_shards,
            max_side=args.max_side,
            quality=args.jpeg_quality,
            workers=args.workers,
            on_row=progress.update,
        )
    except (InputError, OSError, tf.errors.OpError) as error:
        if progress.last_rows >= 0 and progress.in_place:
            sys.stderr.write("\n")
        print(f"error: {error}\nno shard was written", file=sys.stderr)
        return 1
    progress.finish(report)
    print_skips(report, sys.stderr)
    if report.written == 0:
        why = "no rows found" if report.rows_read == 0 else f"all {report.rows_read:,} skipped"
        print(f"error: nothing usable in {inputs} ({why}); no shard was written", file=sys.stderr)
        return 1

    files = f"{args.output}-*.tfrecord"
    others = sorted(set(tf.io.gfile.glob(files)) - set(report.paths))
    if others:
        print(
            f"warning: {len(others)} older files also match {files}, e.g. {others[0]}",
            file=sys.stderr,
        )
        files = f"{args.output}-*-of-{args.num_shards:05d}.tfrecord"
    if report.written < args.num_shards:
        empty = args.num_shards - report.written
        print(f"warning: {empty} shards are empty (fewer records than shards)", file=sys.stderr)
    counts = f"{report.rows_read:,} rows read, {report.num_skipped:,} skipped"
    if args.max_side:
        counts += f", {report.resized:,} resized"
    if report.reencoded:
        counts += f", {report.reencoded:,} re-encoded as JPEG"
    shards = f"{args.num_shards} shard{'s' if args.num_shards > 1 else ''}"
    print(f"wrote {report.written:,} records into {shards} ({counts}); config: files={files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
