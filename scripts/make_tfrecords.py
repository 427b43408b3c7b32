"""Converts a CSV or JSONL manifest of (image path, caption) into N TFRecord shards.

    python -m scripts.make_tfrecords --input pairs.csv --output out/pairs --num_shards 8

writes out/pairs-00000-of-00008.tfrecord ... with features {image: file bytes, caption: UTF-8};
config.input.source = dict(name="tfrecord", files="out/pairs-*.tfrecord") reads them.
CSV files need a header row; relative image paths are relative to the manifest.
"""

from __future__ import annotations

import argparse
import sys

from data.tfrecords import read_manifest, write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="manifest: .csv (with header) or .jsonl")
    parser.add_argument("--output", required=True, help="output prefix, e.g. out/pairs")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    args = parser.parse_args(argv)

    pairs = read_manifest(args.input, args.image_column, args.caption_column)
    stats = write_shards(pairs, args.output, args.num_shards)
    written = sum(stats.records_per_shard)
    print(f"wrote {written} records into {len(stats.paths)} shards: {stats.paths[0]} ...")
    if stats.unreadable_images:
        print(
            f"skipped {len(stats.unreadable_images)} unreadable images, e.g. "
            f"{stats.unreadable_images[0]}",
            file=sys.stderr,
        )
    if written == 0:
        print(f"error: no record written from {args.input}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
