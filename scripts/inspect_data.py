"""Builds the training input of a config and reports batch shapes, throughput and skipped records.

    python -m scripts.inspect_data --config configs/data_fashion_mnist.py [--batches 20] [--json]
    python -m scripts.inspect_data --config configs/data_fashion_mnist.py:split=test
        [--config.input.batch_size=64 ...]

The config file exposes get_config(arg) returning an ml_collections.ConfigDict with an `input`
block (data/config.py). Batches are built as global arrays on a 1-D "data" mesh of all devices,
exactly as training receives them. examples_per_sec counts batches after the first, which also
pays for start-up (filling the first shuffle window). state_bytes is the size of the input
position a checkpoint stores (a few hundred bytes, whatever the shuffle buffer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from scripts import terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides


def inspect(config: Any, num_batches: int) -> dict[str, Any]:
    """Reads num_batches global batches of config.input; returns the report as a dict."""
    import jax
    import numpy as np

    from data.config import validate_input_config
    from data.pipeline import make_global_iterator

    if num_batches < 1:
        raise ValueError("--batches must be >= 1")
    cfg = validate_input_config(config.input)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    iterator = make_global_iterator(cfg, mesh)
    shapes: dict[str, list[Any]] = {}
    start = time.perf_counter()
    for i in range(num_batches):
        batch = next(iterator)
        jax.block_until_ready(batch)
        if i == 0:
            shapes = {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()}
            first_done = time.perf_counter()
    end = time.perf_counter()
    timed_batches, elapsed = (
        (num_batches - 1, end - first_done) if num_batches > 1 else (1, end - start)
    )
    return {
        "batches": num_batches,
        "examples": num_batches * cfg.batch_size,
        "examples_per_sec": round(timed_batches * cfg.batch_size / max(elapsed, 1e-9), 1),
        "skipped": iterator.skipped(),
        "shapes": shapes,
        "batch_size": cfg.batch_size,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "state_bytes": int(np.asarray(iterator.get_state()).nbytes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flag(parser)
    parser.add_argument("--batches", type=terminal.positive_int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    terminal.quiet_libraries(args.verbose)

    report = inspect(load_config(args.config, overrides), args.batches)
    if args.json:
        print(json.dumps(report))
        return 0
    for key, (shape, dtype) in report["shapes"].items():
        print(f"{key:>6}: {dtype}{shape}")
    print(
        f"{report['examples']} examples in {report['batches']} batches of {report['batch_size']} "
        f"on {report['devices']} devices: {report['examples_per_sec']:.0f} examples/s"
    )
    print("skipped: " + ", ".join(f"{k}={v}" for k, v in report["skipped"].items()))
    print(f"iterator state: {report['state_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(terminal.run(main))
