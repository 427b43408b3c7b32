"""Expensive fixture work done once per test session, whichever test worker asks for it first.

`make test` runs the tests in several pytest-xdist workers, and a module fixture runs once in each
worker that gets one of its module's tests: a fixture that trains a model would train it up to
once per worker. `once_per_session` keeps the result in a folder that all workers of the session
share; the first worker to ask builds it under a file lock while the others wait, then every
worker reads the same result. Tests must treat what it built as read-only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def session_root(tmp_path_factory) -> Path:
    """A folder shared by every worker of this test session (the session's base temp folder
    when not running under xdist)."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base temp is a sub-folder (popen-gwN) of the session's.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> Any:
    """`build(folder)`'s JSON-serialisable result, computed once per session in `folder`.

    A build that raised leaves nothing behind: the next worker to ask builds again, and sees
    the same error in its own test.
    """
    root = session_root(tmp_path_factory)
    folder = root / f"once-{name}"
    result_file = folder / "result.json"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not result_file.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            result_file.write_text(json.dumps(result))
        return json.loads(result_file.read_text())
