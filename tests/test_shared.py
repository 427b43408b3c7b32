"""tests/shared.py: a fixture's work done once per session however many workers ask."""

import threading
import time

import pytest

from tests.shared import once_per_session


class FakeFactory:
    def __init__(self, base):
        self.base = base

    def getbasetemp(self):
        return self.base


def test_concurrent_callers_share_one_build_and_a_failed_build_is_retried(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    factory = FakeFactory(tmp_path)
    builds = []

    def build(folder):
        builds.append(folder)
        time.sleep(0.2)  # long enough for the other callers to be waiting on the lock
        (folder / "made").write_text("x")
        return {"folder": str(folder), "n": len(builds)}

    results = []
    callers = [
        threading.Thread(target=lambda: results.append(once_per_session(factory, "a", build)))
        for _ in range(3)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1 and results == [{"folder": str(tmp_path / "once-a"), "n": 1}] * 3

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("no disk")

    with pytest.raises(RuntimeError, match="no disk"):
        once_per_session(factory, "b", broken)
    result = once_per_session(factory, "b", build)  # built again, from an empty folder
    assert result["n"] == 2 and not (tmp_path / "once-b" / "half").exists()
