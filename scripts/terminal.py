"""What an entry point prints before its own first line: nothing, unless asked with -v.

TensorFlow and XLA log start-up chatter through their C++ logging (oneDNN notes, "could not find
cuda drivers", cuInit errors on a machine without a GPU) and absl; none of it concerns a user, and
two of those lines claim to be errors. Their C++ logging reads TF_CPP_MIN_LOG_LEVEL once, when
the library loads, so `quiet_libraries` must run before tensorflow or jax is imported: entry
points parse their flags first and import the heavy modules afterwards (which also keeps --help
fast). TensorFlow 2.21 writes its import-time lines through absl's C++ log before any setting is
read, so `quiet_libraries` imports it with the process's stderr pointed at /dev/null; Python
errors are still raised and printed afterwards.

Orbax logs every failure of a checkpoint write at error level, with tracebacks, from each of its
background threads, and then raises it; contrastive/checkpoint.py turns what it raises into one
line (CheckpointWriteError), so without -v orbax's own log records are not shown. When one array
write of a checkpoint fails, orbax abandons the writes of the others that had not started yet;
Python then warns at exit that those coroutines were never awaited, which is not shown either.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts and sizes: refused before anything runs)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (where 0 means "none" or "off")."""
    return _int_at_least(text, 0)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show TensorFlow / JAX start-up logs and info-level logging",
    )


def quiet_libraries(verbose: bool = False) -> None:
    """Silences library start-up logs (keeps warnings of our own); -v keeps everything."""
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING)
    absl_logger = logging.getLogger("absl")
    absl_logger.setLevel(logging.ERROR)
    absl_logger.addFilter(_not_from_orbax)
    # Orbax's writes run as asyncio tasks; asyncio logs a failed one that nobody awaited.
    logging.getLogger("asyncio").addFilter(_not_from_orbax)
    warnings.filterwarnings(
        "ignore",
        message=r"coroutine '.*async_serialize.*' was never awaited",
        category=RuntimeWarning,
    )
    # Imported here, under a silenced stderr, so their C++ start-up logs never show. A benchmark
    # host may have no TensorFlow at all: the step benchmarks need none.
    with _stderr_to_devnull():
        for name in ("tensorflow", "tensorflow_text"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)


def _not_from_orbax(record: logging.LogRecord) -> bool:
    """False for records orbax logs (absl logs them all under one logger name) or that carry an
    exception raised inside orbax."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        return False
    return not (record.exc_info and _raised_in_orbax(record.exc_info))


def _raised_in_orbax(exc_info) -> bool:
    traceback = exc_info[2]
    while traceback is not None:
        if f"{os.sep}orbax{os.sep}" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


@contextlib.contextmanager
def _stderr_to_devnull():
    """Points file descriptor 2 (where C++ libraries log) at /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Failures that are not bugs, by exception class name (the checkpoint errors are named, not
# imported: importing contrastive.checkpoint_failures here would load orbax), and their exit status.
QUIET_FAILURES = {"FloatingPointError": 3, "DamagedCheckpoint": 4, "CheckpointWriteError": 5}


def run(main: Callable[[], Any]) -> int:
    """Runs an entry point's main as a program and returns its exit status: main's own when it
    returns an int, else 0 (zeroshot_eval's main returns its report, for Python callers).

    First, before any library starts a thread, glibc malloc is tuned for XLA's CPU runtime
    (scripts/host_memory.py; HETXL_KEEP_HOST_MEMORY=0 opts out), and asyncio's reports of
    operations orbax abandoned after a failure are silenced (see _without_closed_loop_reports).

    A mistake in the config or its overrides (ConfigError) prints "error: invalid config" and
    one line per problem, exit status 2; a run halted on non-finite updates prints why, exit
    status 3; a workdir whose checkpoints are all damaged, exit status 4; a checkpoint that could
    not be written (no space left, no write permission), exit status 5. None of them is a bug, so
    none gets a traceback; everything else keeps its own.
    """
    from scripts.host_memory import keep_host_memory

    keep_host_memory()
    sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)
    try:
        status = main()
    except Exception as error:
        from data.config_blocks import ConfigError  # the entry point has imported it by now

        if isinstance(error, ConfigError):
            report_config_problems(error.problems)
            return 2
        names = [kind.__name__ for kind in type(error).__mro__]
        status = next((QUIET_FAILURES[name] for name in names if name in QUIET_FAILURES), None)
        if status is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return status
    # sys.exit of anything but an int prints it and exits 1: a report must not read as a failure.
    return status if isinstance(status, int) else 0


def report_config_problems(problems: list[str], heading: str = "invalid config") -> None:
    """ "error: HEADING (N problems):" on stderr, then one indented line per problem."""
    count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
    print(f"error: {heading}{count}:", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)


def _without_closed_loop_reports(hook: Callable) -> Callable:
    """`hook`, silent about asyncio's "Event loop is closed".

    When one item of a checkpoint write or read fails, orbax stops waiting for the others;
    those still in flight finish later (while the run goes on from an older checkpoint, or while
    the interpreter shuts down after the one-line error), after the event loop that awaited them
    is closed, and each reports that through sys.unraisablehook: one traceback per array, none
    of them saying more than the error already reported.
    """

    def report(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        hook(unraisable)

    return report
