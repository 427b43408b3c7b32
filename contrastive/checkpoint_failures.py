"""How a checkpoint fails: damaged when read back, or not written.

DamagedCheckpoint: a step that orbax cannot read, whose arrays differ from the checksums written
with them (contrastive/integrity.py), or whose parameters are not finite (`verify`).
CheckpointWriteError: a save that failed, with the operating system's reason when the error
chain carries one (`write_failure_cause`), e.g. "No space left on device [ENOSPC] (path)".
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from contrastive.integrity import differing, nonfinite_arrays


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read or does not match what was written."""

    def __init__(self, step: int, reason: str):
        self.step, self.reason = step, reason
        super().__init__(f"checkpoint {step} is damaged: {reason}")


class CheckpointWriteError(Exception):
    """A save that failed; the checkpoints finalized before it are untouched."""

    def __init__(self, step: int, directory: str, cause: str, intact: int | None):
        self.step, self.directory, self.cause, self.intact = step, directory, cause, intact
        kept = (
            "no earlier checkpoint could be listed there"
            if intact is None
            else f"the latest intact one is checkpoint {intact}"
        )
        super().__init__(
            f"saving checkpoint {step} to {directory} failed: {cause}; {kept}. Free space or "
            "restore write access there, then rerun the same command to resume"
        )


# Tensorstore (which writes the arrays) reports an operating-system error inside its message:
# ... local file "PATH": ... File too large [os_error_code='27']
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code=\W?(\d+)")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def write_failure_cause(error: BaseException) -> str:
    """The operating system's reason (e.g. "No space left on device [ENOSPC] (path)") when the
    error chain carries one, else the error's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return _os_reason(seen.errno, seen.filename)
        code = _TENSORSTORE_OS_ERROR.search(str(seen))
        if code:
            path = _TENSORSTORE_FILE.search(str(seen))
            return _os_reason(int(code.group(1)), path.group(1) if path else None)
        seen = seen.__cause__ or seen.__context__
    return first_line(error)


def _os_reason(number: int, filename: str | None) -> str:
    name = errno.errorcode.get(number, f"errno {number}")
    return f"{os.strerror(number)} [{name}]" + (f" ({filename})" if filename else "")


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def verify(step: int, recorded: dict, actual: dict, params: Any) -> None:
    """Raises DamagedCheckpoint unless the arrays match their checksums and params are finite."""
    bad = differing(recorded, actual)
    if bad:
        raise DamagedCheckpoint(
            step, f"{len(bad)} array(s) differ from the checksums written with them, e.g. {bad[0]}"
        )
    nonfinite = nonfinite_arrays(params)
    if nonfinite:
        raise DamagedCheckpoint(
            step, f"non-finite parameters in {len(nonfinite)} array(s), e.g. {nonfinite[0]}"
        )
