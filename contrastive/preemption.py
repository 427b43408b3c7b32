"""A flag the train loop polls, set by the signal that announces a preemption."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class PreemptionGuard:
    """Turns SIGTERM (and, with catch_sigint, Ctrl-C) into a flag the train loop polls.

    Cluster schedulers send SIGTERM some seconds before killing a job. The handler only sets a
    flag, because a signal handler runs between two bytecodes of the main thread, possibly in
    the middle of a train step or a save; the loop checks `requested` after each step, saves and
    stops. On exit the previous handlers are restored. Must be entered in the main thread.

    With several processes the signal may reach them at different steps while `save` is
    collective: combine the flags across processes first (e.g. with
    jax.experimental.multihost_utils.process_allgather) and act on their any().
    """

    def __init__(self, catch_sigint: bool = False):
        self._signals = (signal.SIGTERM, signal.SIGINT) if catch_sigint else (signal.SIGTERM,)
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived inside the context."""
        return self._event.is_set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_number = signum
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
