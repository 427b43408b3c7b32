r"""Run a command as a multi-process JAX job on this machine (CPU devices, 127.0.0.1).

    python -m scripts.local_cluster --processes 2 --devices_per_process 4 [--port PORT] -- \
        python -m scripts.train --config configs/demo.py --workdir workdirs/two_processes

Starts the command once per process with JAX_PLATFORMS=cpu, N simulated CPU devices (XLA_FLAGS)
and the coordinator address, process count and process id in JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which scripts.distributed reads: a rehearsal, on one
machine, of a job on several hosts. A command starting with `python` runs under this Python.

Every output line is prefixed with its process index ("[1] ..."). When a process fails, the
others get SIGTERM and, 5 s later, SIGKILL. Ctrl-C or SIGTERM to the launcher is passed on as
SIGTERM (the trainer then saves a checkpoint and exits 0), with SIGKILL after --grace_s or at a
second Ctrl-C. The exit status is 0 only when every process exits 0; otherwise that of the
first process to fail (128 + N for a process killed by signal N).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TextIO

from scripts.distributed import COORDINATOR_ADDRESS_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV
from scripts.terminal import positive_int

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
POLL_INTERVAL_S = 0.05
# Once a process has failed the others cannot checkpoint (saving is collective) and are usually
# blocked in a collective with the missing process; a JAX process with jax.distributed started
# also catches SIGTERM for its preemption service. So SIGKILL follows soon.
FAILURE_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(
    base: dict[str, str], process_id: int, processes: int, devices_per_process: int, port: int
) -> dict[str, str]:
    """The environment of process `process_id`: `base` plus the CPU platform, its device count
    (replacing any device count already in XLA_FLAGS, whose last copy XLA would otherwise pick
    up in an order nobody should rely on) and where and as whom to join the job."""
    xla_flags = [
        flag for flag in base.get("XLA_FLAGS", "").split() if not flag.startswith(DEVICE_COUNT_FLAG)
    ]
    xla_flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
    return {
        **base,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(xla_flags),
        COORDINATOR_ADDRESS_ENV: f"127.0.0.1:{port}",
        NUM_PROCESSES_ENV: str(processes),
        PROCESS_ID_ENV: str(process_id),
        # Children write into pipes; without this a Python child's lines arrive in 8 KB blocks.
        "PYTHONUNBUFFERED": "1",
    }


def resolve_command(command: list[str]) -> list[str]:
    """Run `python ...` under the launcher's own interpreter (the project's environment)."""
    if command and command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return list(command)


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def shell_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, even by SIGKILL, so that no
    process of the job outlives it (each child has its own session, out of reach of the
    terminal's Ctrl-C, which the launcher forwards itself)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Output:
    """Copies the children's lines to the launcher's streams, prefixed, one line at a time."""

    def __init__(self, stdout: TextIO, stderr: TextIO):
        self._targets = {"stdout": stdout, "stderr": stderr}
        self._lock = threading.Lock()

    def pump(self, prefix: str, stream, target: str) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self.write(target, prefix + (line if line.endswith("\n") else line + "\n"))
        stream.close()

    def write(self, target: str, text: str) -> None:
        with self._lock:
            out = self._targets[target]
            try:
                out.write(text)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the reader went away; keep draining so children never block on a pipe


def run(
    command: list[str],
    processes: int,
    devices_per_process: int,
    port: int | None = None,
    grace_s: float = 60.0,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run `command` as `processes` processes; return the job's exit status (see the module
    docstring). Call from the main thread: it handles SIGINT and SIGTERM while it runs."""
    output = _Output(stdout or sys.stdout, stderr or sys.stderr)
    port = port or free_port()
    argv = resolve_command(command)
    # Handlers first: a signal that arrives while the children start is passed on to them once
    # they run, instead of killing the launcher and orphaning them.
    signals_received: list[int] = []

    def on_signal(signum, frame) -> None:
        signals_received.append(signum)

    previous_handlers = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    children: list[subprocess.Popen] = []
    for process_id in range(processes):
        children.append(
            subprocess.Popen(
                argv,
                env=child_environment(
                    dict(os.environ), process_id, processes, devices_per_process, port
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        )
    # Both pipes of every child are read at once, so none fills up and blocks its writer.
    pumps = [
        threading.Thread(
            target=output.pump, args=(f"[{i}] ", getattr(child, name), name), daemon=True
        )
        for i, child in enumerate(children)
        for name in ("stdout", "stderr")
    ]
    for pump in pumps:
        pump.start()

    def announce(message: str) -> None:
        output.write("stderr", f"local_cluster: {message}\n")

    def send(sig: signal.Signals) -> None:
        # To each child's whole session: a command that is a shell script takes its children
        # with it.
        for child in children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    pass

    first_failure: tuple[int, int] | None = None
    kill_at: float | None = None
    forwarded = 0
    try:
        while True:
            running = [child.poll() is None for child in children]  # polls every child
            if not any(running):
                break
            if first_failure is None:
                for i, child in enumerate(children):
                    if child.returncode not in (None, 0):
                        first_failure = (i, child.returncode)
                        announce(
                            f"process {i} failed ({describe_status(child.returncode)}); "
                            "stopping the others"
                        )
                        send(signal.SIGTERM)
                        kill_at = time.monotonic() + FAILURE_GRACE_S
                        break
            if len(signals_received) > forwarded:
                name = signal.Signals(signals_received[-1]).name
                if forwarded == 0:
                    announce(f"{name}: passing SIGTERM on to every process")
                    send(signal.SIGTERM)
                    if kill_at is None:
                        kill_at = time.monotonic() + grace_s
                else:
                    announce(f"{name} again: killing every process")
                    send(signal.SIGKILL)
                forwarded = len(signals_received)
            if kill_at is not None and time.monotonic() > kill_at:
                announce("still running after SIGTERM: killing")
                send(signal.SIGKILL)
                kill_at = None
            time.sleep(POLL_INTERVAL_S)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        send(signal.SIGKILL)  # only reached with children alive if the launcher itself failed
        for child in children:
            child.wait()
        for pump in pumps:
            pump.join(timeout=5)

    statuses = [child.returncode for child in children]
    if first_failure is None:
        first_failure = next(((i, code) for i, code in enumerate(statuses) if code != 0), None)
    if first_failure is None:
        return 0
    index, code = first_failure
    others = ", ".join(f"{i}: {describe_status(c)}" for i, c in enumerate(statuses) if i != index)
    announce(
        f"process {index} of {processes} failed ({describe_status(code)})"
        + (f"; others: {others}" if others else "")
    )
    return shell_status(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python -m scripts.local_cluster --processes P --devices_per_process N "
        "[--port PORT] [--grace_s S] -- COMMAND ...",
    )
    parser.add_argument("--processes", type=positive_int, required=True)
    parser.add_argument("--devices_per_process", type=positive_int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--grace_s",
        type=float,
        default=60.0,
        help="seconds the processes get to save a checkpoint after Ctrl-C / SIGTERM before "
        "SIGKILL (default %(default)s)",
    )
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("give the command to run after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be at least 1")
    return run(command, args.processes, args.devices_per_process, args.port, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
