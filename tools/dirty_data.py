"""Dirty data at scale: the training input skips exactly the injected bad records, at clean speed.

    python -m tools.dirty_data --records 100000 --bad_fraction 0.01 [--json OUT] [--workdir DIR]

Writes two TFRecord sets of `--records` image-caption records each (32 px JPEG and PNG images,
short captions): a clean one, and a dirty one in which a `--bad_fraction` of the records has each
of seven faults (so 7 x bad_fraction of them are bad):

    truncated_image   the image's first half          -> undecodable
    html_image        an HTML error page as the image -> undecodable
    empty_image       zero image bytes                -> empty_image
    empty_caption     "" or whitespace                -> empty_text
    long_caption      one byte over max_text_bytes+   -> text_too_long
    non_utf8_caption  Latin-1 bytes                   -> text_not_utf8
    missing_field     no image or no caption feature  -> missing_field

The generator keeps a ledger of what it injected; the expected skipped counts follow from the
ledger and the table above, not from the pipeline's checks. Both sets are then read to the end
through the training input (data/pipeline.py's global iterator, uint8 images, device prefetch, as
the trainer builds it) with the input block of a training config (--config, default
configs/pretrain.py with 32 px images: its op string, shuffle buffer and batch size), made a
single pass (num_epochs=1) on one device so that the pass ends. Every dirty pass must report
exactly the expected counts per reason and deliver every good record, every clean pass no skip;
the exit status is 1 otherwise (a throughput below target is reported, not an error: it depends
on the machine).

Throughput is measured in rounds that alternate the order (clean-dirty, dirty-clean, ...) so that
a machine getting slower or faster during the run affects both sets alike, after a few untimed
batches that pay the process's one-time start-up costs. Each pass is timed by the wall clock and
by the process's CPU time (all threads): on a machine shared with other work the wall clock
mostly measures that work, while CPU seconds measure the pipeline's own. The target, dirty within
5% of clean, is on good records per CPU second: good records are what training receives, and
their rate holds only when skipping a bad record costs much less than preparing a good one (at
7% bad records, less than 70% of it), since the dirty set also pays for its bad records. Records
read (bad ones included) per second are reported too: their ratio compares the cost of a bad
record with that of a good one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from scripts import terminal
from scripts.terminal import positive_int

# Each fault and the reason the pipeline is documented to give it (data/records.py).
FAULTS = {
    "truncated_image": "undecodable",
    "html_image": "undecodable",
    "empty_image": "empty_image",
    "empty_caption": "empty_text",
    "long_caption": "text_too_long",
    "non_utf8_caption": "text_not_utf8",
    "missing_field": "missing_field",
}
HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
    b"<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>"
)
IMAGE_POOL = 64  # distinct images per format; records reuse them
IMAGE_SIDE = 32
THROUGHPUT_TARGET = 0.95
RATE_LABELS = {
    "good_per_cpu_s": "good records / CPU s",
    "records_per_cpu_s": "records / CPU s",
    "good_per_s": "good records / s",
    "records_per_s": "records / s",
}
TARGET_RATE = "good_per_cpu_s"
WARM_UP_BATCHES = 5
NOUNS = ("dog", "bicycle", "mountain lake", "café terrace", "red kite", "street market")
ADJECTIVES = ("small", "bright", "blurry", "old", "crowded", "quiet")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1 / len(FAULTS):
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1/{len(FAULTS)}] (each of {len(FAULTS)} faults), got {value}"
        )
    return value


def plan_faults(records: int, bad_fraction: float, seed: int) -> list[str | None]:
    """The fault of each record (None: a good record): round(records * bad_fraction) records of
    each fault, at random positions."""
    per_fault = round(records * bad_fraction)
    kinds: list[str | None] = [None] * records
    positions = np.random.default_rng(seed).permutation(records)
    for k, fault in enumerate(FAULTS):
        for index in positions[k * per_fault : (k + 1) * per_fault]:
            kinds[index] = fault
    return kinds


def expected_skipped(ledger: collections.Counter, reasons: tuple[str, ...]) -> dict[str, int]:
    """Per-reason skipped counts the ledger of injected faults implies."""
    expected = dict.fromkeys(reasons, 0)
    for fault, count in ledger.items():
        expected[FAULTS[fault]] += count
    return expected


def image_pool(seed: int) -> list[bytes]:
    """2 * IMAGE_POOL distinct IMAGE_SIDE px images: gradients with noise, JPEG and PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, IMAGE_SIDE)
    shape = (IMAGE_SIDE, IMAGE_SIDE, 3)
    pool = []
    for k in range(2 * IMAGE_POOL):
        rows, columns = rng.uniform(0, 1, (2, 3))
        base = rows * ramp[:, None, None] + columns * ramp[None, :, None]
        pixels = np.clip(base / 2 + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG" if k % 2 else "PNG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def caption(i: int) -> str:
    return f"a {ADJECTIVES[i % 6]} photo of a {NOUNS[i // 6 % 6]}, number {i}"


def serialize(features: dict[str, bytes]) -> bytes:
    """A tf.train.Example of bytes features (any subset of image and caption)."""
    import tensorflow as tf

    feature = {
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        for key, value in features.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def make_record(i: int, fault: str | None, pool: list[bytes], max_text_bytes: int) -> bytes:
    """Record i: a good image-caption pair, or one with exactly the given fault."""
    image, text = pool[i % len(pool)], caption(i).encode()
    if fault == "truncated_image":
        image = image[: len(image) // 2]
    elif fault == "html_image":
        image = HTML_PAGE
    elif fault == "empty_image":
        image = b""
    elif fault == "empty_caption":
        text = b"" if i % 2 else b" \t "
    elif fault == "long_caption":
        text = (text + b" ") * ((max_text_bytes + 64) // len(text) + 1)
        text = text[: max_text_bytes + 1 + i % 64]
    elif fault == "non_utf8_caption":
        text = caption(i).replace("photo", "café photo").encode("latin-1")
    elif fault == "missing_field":
        return serialize({"caption": text} if i % 2 else {"image": image})
    return serialize({"image": image, "caption": text})


def glob_of(prefix: str) -> str:
    """The glob of the files write_set writes under `prefix`."""
    return f"{prefix}-*.tfrecord"


def write_set(
    prefix: str, kinds: list[str | None], pool: list[bytes], shards: int, max_text_bytes: int
) -> None:
    """Writes record i with fault kinds[i] into `shards` TFRecord files named after `prefix`."""
    from data.tfrecords import ShardWriter

    with ShardWriter(prefix, shards) as writer:
        for i, fault in enumerate(kinds):
            writer.write(make_record(i, fault, pool, max_text_bytes))


def input_block(config_spec: str, files: str) -> Any:
    """The training config's validated input block for `files`, as one finite pass."""
    from data.config import validate_input_config
    from scripts.config_loader import load_config

    separator = "," if ":" in config_spec else ":"
    config = load_config(f"{config_spec}{separator}files={files}")
    return dataclasses.replace(validate_input_config(config.input), num_epochs=1)


@dataclasses.dataclass
class Pass:
    """One read of a set to its end: its wall-clock and CPU seconds, records read, rows
    delivered (good records) and skipped counts."""

    dataset: str
    round_index: int
    seconds: float
    cpu_seconds: float
    records: int
    rows: int
    skipped: dict[str, int]

    def rates(self) -> dict[str, float]:
        return {
            "good_per_cpu_s": self.rows / self.cpu_seconds,
            "records_per_cpu_s": self.records / self.cpu_seconds,
            "good_per_s": self.rows / self.seconds,
            "records_per_s": self.records / self.seconds,
        }


@contextlib.contextmanager
def stderr_silenced(silence: bool):
    """Points file descriptor 2 at /dev/null: the JPEG library writes a line there for every
    truncated image it is given, thousands of lines that say nothing the counts do not."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def training_input(cfg: Any) -> Any:
    """The global batch iterator the trainer builds (uint8 images, two batches in flight), on
    one device: a finite pass ends with a short batch, which only a one-device mesh can hold."""
    import jax

    from data.pipeline import make_global_iterator

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    return make_global_iterator(cfg, mesh, uint8_images=True, device_prefetch=2)


def warm_up(cfg: Any, batches: int, quiet: bool) -> None:
    """Reads a few batches untimed: thread pools, kernels and the tokenizer start on the first
    pass of a process, which would otherwise be charged to whichever set is read first."""
    import itertools

    import jax

    with stderr_silenced(quiet):
        for batch in itertools.islice(training_input(cfg), batches):
            jax.block_until_ready(batch)


def read_pass(cfg: Any, dataset: str, round_index: int, records: int, quiet: bool) -> Pass:
    """Reads the set to its end through the training input; times the batches (the iterator's
    construction, the same for both sets, is left out)."""
    import jax

    with stderr_silenced(quiet):
        iterator = training_input(cfg)
        rows = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in iterator:
            jax.block_until_ready(batch)
            rows += batch["image"].shape[0]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        skipped = iterator.skipped()
    return Pass(dataset, round_index, seconds, cpu_seconds, records, rows, skipped)


def check_pass(result: Pass, expected: dict[str, int]) -> list[str]:
    """What differs from the expectation: per-reason counts, and rows (every good record)."""
    problems = [
        f"{result.dataset} round {result.round_index}: {reason} counted {result.skipped[reason]}, "
        f"injected {count}"
        for reason, count in expected.items()
        if result.skipped.get(reason) != count
    ]
    good = result.records - sum(expected.values())
    if result.rows != good:
        where = f"{result.dataset} round {result.round_index}"
        problems.append(f"{where}: {result.rows} records delivered, {good} good")
    return problems


def summarize(passes: list[Pass]) -> dict[str, Any]:
    """Per rate (Pass.rates): the median of each set and the median of the per-round
    dirty / clean ratios; and whether TARGET_RATE's ratio meets the target."""
    by_round: dict[int, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    for result in passes:
        by_round[result.round_index][result.dataset] = result.rates()
    rounds = [by_round[r] for r in sorted(by_round)]
    summary: dict[str, Any] = {}
    for rate in rounds[0]["clean"]:
        ratios = [r["dirty"][rate] / r["clean"][rate] for r in rounds]
        summary[rate] = {
            "clean": statistics.median(r["clean"][rate] for r in rounds),
            "dirty": statistics.median(r["dirty"][rate] for r in rounds),
            "ratio": statistics.median(ratios),
            "ratio_by_round": ratios,
        }
    ratio = summary[TARGET_RATE]["ratio"]
    return {**summary, "target": THROUGHPUT_TARGET, "within_target": ratio >= THROUGHPUT_TARGET}


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['records']:,} records per set, {report['bad_records']:,} bad in the dirty set "
        f"({report['bad_fraction']:g} of each of {len(FAULTS)} faults); written in "
        f"{report['generation_seconds']:.1f} s"
    )
    print(f"input: {report['pp']}, batch {report['batch_size']}, shuffle {report['shuffle']}")
    print(f"{'reason':<16}{'injected':>10}{'counted':>10}")
    counted = report["counted_skipped"]
    for reason, count in report["expected_skipped"].items():
        mark = "" if counted.get(reason) == count else "  MISMATCH"
        print(f"{reason:<16}{count:>10,}{counted.get(reason, 0):>10,}{mark}")
    print("counts: " + ("exact" if report["counts_exact"] else "WRONG"))
    t = report["throughput"]
    print(f"throughput, median of {report['rounds']} alternating rounds:")
    print(f"{'':<22}{'clean':>10}{'dirty':>10}{'dirty/clean':>13}")
    for rate, label in RATE_LABELS.items():
        row = t[rate]
        print(f"{label:<22}{row['clean']:>10,.0f}{row['dirty']:>10,.0f}{row['ratio']:>13.3f}")
    verdict = "within" if t["within_target"] else "NOT within"
    print(f"dirty is {verdict} {1 - t['target']:.0%} of clean in {RATE_LABELS[TARGET_RATE]}")
    print(f"total {report['total_seconds']:.1f} s")


def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """Writes both sets, reads them in alternating rounds; returns the report."""
    from data.records import BAD_RECORD_REASONS

    begin = time.perf_counter()
    kinds = plan_faults(args.records, args.bad_fraction, args.seed)
    ledger = collections.Counter(kind for kind in kinds if kind is not None)
    expected = expected_skipped(ledger, BAD_RECORD_REASONS)
    prefixes = {name: os.path.join(workdir, name, "pairs") for name in ("clean", "dirty")}
    configs = {name: input_block(args.config, glob_of(p)) for name, p in prefixes.items()}
    pool = image_pool(args.seed)
    faults = {"clean": [None] * args.records, "dirty": kinds}
    for name, prefix in prefixes.items():
        write_set(prefix, faults[name], pool, args.shards, configs[name].max_text_bytes)
    generation = time.perf_counter() - begin
    wanted = {"clean": dict.fromkeys(BAD_RECORD_REASONS, 0), "dirty": expected}

    warm_up(configs["clean"], WARM_UP_BATCHES, not args.verbose)
    passes, problems = [], []
    for round_index in range(args.repeats):
        order = ("clean", "dirty") if round_index % 2 == 0 else ("dirty", "clean")
        for name in order:
            result = read_pass(configs[name], name, round_index, args.records, not args.verbose)
            problems += check_pass(result, wanted[name])
            passes.append(result)
            print(
                f"round {round_index} {name}: {result.seconds:.1f} s, "
                f"{result.cpu_seconds:.1f} CPU s",
                file=sys.stderr,
            )
    last_dirty = [p for p in passes if p.dataset == "dirty"][-1]
    return {
        "records": args.records,
        "bad_fraction": args.bad_fraction,
        "bad_records": sum(ledger.values()),
        "injected": {fault: ledger[fault] for fault in FAULTS},
        "expected_skipped": expected,
        "counted_skipped": last_dirty.skipped,
        "counts_exact": not problems,
        "problems": problems,
        "pp": configs["dirty"].pp,
        "batch_size": configs["dirty"].batch_size,
        "shuffle": configs["dirty"].shuffle_buffer,
        "rounds": args.repeats,
        "passes": [{**dataclasses.asdict(p), **p.rates()} for p in passes],
        "throughput": summarize(passes),
        "generation_seconds": generation,
        "total_seconds": time.perf_counter() - begin,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=positive_int, default=100_000, help="records per set")
    parser.add_argument(
        "--bad_fraction", type=_fraction, default=0.01, help="share of records with each fault"
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument(
        "--workdir", help="where the sets are written and kept (default: a temporary folder)"
    )
    parser.add_argument(
        "--config",
        default="configs/pretrain.py:image=32",
        help="training config whose input block reads the sets; the script adds files=GLOB to "
        "its argument",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating rounds")
    parser.add_argument("--shards", type=positive_int, default=8, help="TFRecord files per set")
    parser.add_argument("--seed", type=int, default=0)
    terminal.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    terminal.quiet_libraries(args.verbose)

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        report = run(args, args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix="dirty-data-")
        try:
            report = run(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    for problem in report["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)
    return 0 if report["counts_exact"] else 1


if __name__ == "__main__":
    sys.exit(terminal.run(main))
