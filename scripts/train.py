"""Train any method from a config file.

    python -m scripts.train --config configs/demo.py[:arg] --workdir DIR [--config.a.b=value ...]

Restarts from the latest checkpoint in DIR automatically. SIGTERM saves a checkpoint and exits 0.
Several processes (a TPU slice, GPU hosts, scripts.local_cluster): see scripts/distributed.py.
"""

from __future__ import annotations

import argparse
import sys

from scripts import distributed, terminal
from scripts.config_loader import add_config_flag, load_config, parse_args_with_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flag(parser)
    parser.add_argument("--workdir", required=True)
    distributed.add_flags(parser)
    terminal.add_verbose_flag(parser)
    args, overrides = parse_args_with_overrides(parser, argv)
    terminal.quiet_libraries(args.verbose)
    distributed.initialize(args)  # before anything starts a jax backend
    # Imported after parsing: --help stays fast and the logging settings above apply.
    import jax

    from contrastive.trainer import train

    config = load_config(args.config, overrides)
    result = train(config, args.workdir)
    if jax.process_index() == 0:
        print(f"finished at step {result.step}" + (" (preempted)" if result.preempted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(terminal.run(main))
