"""Plant known bugs one at a time and check that the tests catch every one (mutation testing).

    python -m tools.mutation_check [--only NAME ...] [--list] [--jobs N] [--timeout S]
                                     [--no-baseline]

Each mutation (listed in tools/planted_bugs.py) is a plausible one-line mistake in the
numerical core (a wrong axis, a missing scale, an off-by-one, a sign, a sum for a mean, a dropped
temperature, a wrong reduction over devices), written as an exact snippet of the current source
and its replacement, with the few tests that must catch it. The working tree is copied to a
temporary directory (without .venv, .git and caches); there each mutation is applied alone, its
tests run with this interpreter (`pytest -x -q`), and the file is restored. A mutation is
"killed" when its tests fail (a collection error counts: the mutated module no longer imports),
"SURVIVED" when they pass.

Before any mutation, every snippet must occur exactly once in its file, so an edit of the source
that makes the list stale fails loudly instead of silently testing nothing; and the selected tests
must pass on the unmutated copy (the baseline), so a kill means the planted bug was caught. The
exit status is non-zero when a snippet is stale, the baseline fails, or any mutation survives,
times out or selects no tests. Not part of `make test`: the whole list takes about ten minutes
on two CPU cores (a baseline of about four, then a few seconds to half a minute per mutation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.terminal import positive_int
from tools.planted_bugs import MUTATIONS, Mutation

REPO = Path(__file__).resolve().parent.parent

# Never copied: the virtual environment (the interpreter running this script is used instead),
# git metadata, caches and run outputs.
IGNORED = (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "workdirs", "runs")
IGNORED_SUFFIXES = (".pyc", ".egg-info")

DEFAULT_TIMEOUT_S = 900


class StaleMutation(ValueError):
    """A mutation's snippet does not occur exactly once in its file."""


def snippet_problem(mutation: Mutation, root: Path) -> str | None:
    """Why the mutation cannot be applied to the tree at root, or None when it can."""
    path = root / mutation.path
    if not path.is_file():
        return f"{mutation.path} does not exist"
    if mutation.original == mutation.replacement:
        return "the replacement equals the original"
    count = path.read_text().count(mutation.original)
    if count != 1:
        return f"the original snippet occurs {count} times in {mutation.path} (expected once)"
    return None


def apply_mutation(mutation: Mutation, root: Path) -> str:
    """Write the mutated file under root; returns the original text (to restore it)."""
    problem = snippet_problem(mutation, root)
    if problem:
        raise StaleMutation(f"{mutation.name}: {problem}")
    path = root / mutation.path
    text = path.read_text()
    path.write_text(text.replace(mutation.original, mutation.replacement))
    return text


def copy_tree(source: Path, destination: Path) -> None:
    """The working tree without IGNORED directories and compiled files."""

    def ignore(_directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in IGNORED or n.endswith(IGNORED_SUFFIXES)]

    shutil.copytree(source, destination, ignore=ignore, symlinks=True)


def pytest_command(tests: Sequence[str], k: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return command + (["-k", k] if k else [])


def run_pytest(
    root: Path, tests: Sequence[str], k: str | None, timeout_s: float
) -> tuple[int | None, float, str]:
    """(exit code or None on timeout, seconds, output) of pytest on the tree at root."""
    # No bytecode: a restored file of the same size written within the same second could
    # otherwise be imported from the mutated version's cache.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    process = subprocess.Popen(
        pytest_command(tests, k),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout ends all its children
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, time.monotonic() - start, output


def outcome(exit_code: int | None) -> str:
    """pytest's exit code as a mutation outcome: 1 (tests failed) and 2 (collection error, e.g.
    the mutated module does not import) kill it; 0 means it survived."""
    if exit_code is None:
        return "TIMEOUT"
    if exit_code in (1, 2):
        return "killed"
    if exit_code == 0:
        return "SURVIVED"
    if exit_code == 5:
        return "NO TESTS"
    return f"ERROR ({exit_code})"


def baseline_groups(mutations: Sequence[Mutation]) -> dict[str | None, list[str]]:
    """The distinct tests of the mutations, grouped by -k expression (one pytest run each)."""
    groups: dict[str | None, list[str]] = {}
    for mutation in mutations:
        tests = groups.setdefault(mutation.k, [])
        tests.extend(t for t in mutation.tests if t not in tests)
    return groups


def format_table(rows: Sequence[tuple[str, str, float]]) -> str:
    width = max([len("mutation")] + [len(name) for name, _, _ in rows])
    lines = [f"{'mutation':<{width}}  {'result':<10}  {'seconds':>7}", "-" * (width + 21)]
    lines += [f"{name:<{width}}  {result:<10}  {seconds:>7.1f}" for name, result, seconds in rows]
    return "\n".join(lines)


def check_mutations(
    mutations: Sequence[Mutation], workers: int, timeout_s: float, baseline: bool = True
) -> int:
    """Runs every mutation on copies of the tree; prints the table; returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as scratch:
        trees: queue.Queue[Path] = queue.Queue()
        for index in range(workers):
            tree = Path(scratch) / f"tree{index}"
            copy_tree(REPO, tree)
            trees.put(tree)
        if baseline:
            tree = trees.get()
            for k, tests in baseline_groups(mutations).items():
                code, seconds, output = run_pytest(tree, tests, k, timeout_s * len(tests))
                if code != 0:
                    print(output[-4000:])
                    print(f"baseline: the selected tests do not pass unmutated (exit {code})")
                    return 1
                print(f"baseline: {len(tests)} test selections pass ({seconds:.0f} s)", flush=True)
            trees.put(tree)

        def run_one(mutation: Mutation) -> tuple[str, str, float]:
            tree = trees.get()
            try:
                original = apply_mutation(mutation, tree)
                try:
                    code, seconds, _ = run_pytest(tree, mutation.tests, mutation.k, timeout_s)
                finally:
                    (tree / mutation.path).write_text(original)
            finally:
                trees.put(tree)
            result = outcome(code)
            print(f"{mutation.name}: {result} ({seconds:.0f} s)", flush=True)
            return mutation.name, result, seconds

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(run_one, mutations))
    print()
    print(format_table(rows))
    killed = sum(result == "killed" for _, result, _ in rows)
    print(f"\n{len(rows)} mutations: {killed} killed, {len(rows) - killed} not killed")
    return 0 if killed == len(rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run this mutation (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="mutations tested at once, each on its own copy",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds allowed per mutation (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip running the tests unmutated first"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        parser.error("mutation names are not unique")
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows the known ones")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]

    stale = [(m.name, snippet_problem(m, REPO)) for m in selected]
    stale = [(name, problem) for name, problem in stale if problem]
    if args.list:
        for mutation in selected:
            k = f" -k {mutation.k!r}" if mutation.k else ""
            print(f"{mutation.name}\n    {mutation.path}\n    {' '.join(mutation.tests)}{k}")
    for name, problem in stale:
        print(f"STALE {name}: {problem}", file=sys.stderr)
    if stale:
        return 1
    if args.list:
        return 0
    return check_mutations(selected, args.jobs, args.timeout, not args.no_baseline)


if __name__ == "__main__":
    sys.exit(main())
