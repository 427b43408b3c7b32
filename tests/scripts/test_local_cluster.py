"""scripts.local_cluster: real processes on 127.0.0.1 joined by scripts.distributed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from scripts import local_cluster
from tests import REPO

# Every process joins through scripts.distributed, as the entry points do, with the settings
# the launcher put in its environment.
JOIN = """
import argparse, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from scripts import distributed
parser = argparse.ArgumentParser()
distributed.add_flags(parser)
distributed.initialize(parser.parse_args([]))
"""

# A sum over the global array (one value per device, process i contributes i + 1 on each of its
# devices) and a gather of the process indices: both need the collectives between processes.
COLLECTIVES = (
    JOIN
    + """
mesh = jax.make_mesh((jax.device_count(),), ("data",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
values = jax.make_array_from_process_local_data(jax.NamedSharding(mesh, jax.P("data")), local)
total = jax.jit(jnp.sum, out_shardings=jax.NamedSharding(mesh, jax.P()))(values)
ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
# One write: print() writes the newline separately when Python runs unbuffered, and gloo's own
# "connected to peer ranks" lines, written from its threads, could land between the two.
sys.stdout.write(f"process {jax.process_index()} of {jax.process_count()}: devices "
                 f"{jax.device_count()} local {jax.local_device_count()} sum {float(total)} "
                 f"ids {ids.tolist()}\\n")
"""
)

# Process 1 dies while process 0 waits for it in a collective that can never complete.
ONE_DIES = (
    JOIN
    + """
if jax.process_index() == 1:
    {failure}
multihost_utils.process_allgather(np.int32(0))
time.sleep(600)
"""
)


def launch(command: list[str], processes: int = 2, devices: int = 2, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "scripts.local_cluster", "--processes", str(processes)]
        + ["--devices_per_process", str(devices), "--", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_child_environment_sets_the_job_and_replaces_the_device_count():
    base = {"XLA_FLAGS": "--xla_cpu_a=1 --xla_force_host_platform_device_count=8", "HOME": "/h"}
    env = local_cluster.child_environment(base, 1, 3, 4, 5555)
    assert env["XLA_FLAGS"] == "--xla_cpu_a=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5555"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "1")
    assert env["HOME"] == "/h"
    assert base["XLA_FLAGS"].endswith("=8")  # the launcher's own environment is untouched


def test_python_runs_under_the_launchers_interpreter():
    assert local_cluster.resolve_command(["python", "-m", "x"]) == [sys.executable, "-m", "x"]
    assert local_cluster.resolve_command(["bash", "-c", "python"]) == ["bash", "-c", "python"]


def test_command_must_follow_a_double_dash(capsys):
    with pytest.raises(SystemExit):
        local_cluster.main(["--processes", "2", "--devices_per_process", "1"])
    assert "give the command to run after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        local_cluster.main(["--processes", "2", "--devices_per_process", "1", "python"])
    assert "unrecognized arguments: python" in capsys.readouterr().err


def test_two_processes_of_two_devices_run_collectives_together():
    result = launch(["python", "-c", COLLECTIVES])
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(2):
        expected = f"[{i}] process {i} of 2: devices 4 local 2 sum 6.0 ids [0, 1]"
        assert expected in result.stdout.splitlines(), result.stdout
    # Both pipes of every child come through, each line with its process's prefix.
    assert "[0] multi-process start-up: process 0 of 2" in result.stderr
    assert "[1] multi-process start-up: process 1 of 2" in result.stderr


@pytest.mark.parametrize(
    "failure, status",
    [("os._exit(3)", "exit status 3"), ("raise RuntimeError('broken')", "exit status 1")],
    ids=["exits_3", "raises"],
)
def test_a_failing_process_stops_the_job(failure, status):
    # "raises": an uncaught exception must end the process at once (scripts.distributed), not
    # wait in JAX's shutdown barrier for a peer that waits for it.
    start = time.monotonic()
    result = launch(["python", "-c", ONE_DIES.format(failure=failure)])
    elapsed = time.monotonic() - start
    assert result.returncode == int(status.split()[-1]), result.stderr
    assert elapsed < 60
    assert f"local_cluster: process 1 failed ({status}); stopping the others" in result.stderr
    assert f"local_cluster: process 1 of 2 failed ({status})" in result.stderr


def test_sigterm_to_the_launcher_reaches_every_process():
    # Each process says "ready", then exits 0 on SIGTERM, as the trainer does after its
    # checkpoint; the launcher then exits 0.
    code = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('stopping', flush=True), sys.exit(0)))\n"
        "print('ready', os.environ['JAX_PROCESS_ID'], flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scripts.local_cluster", "--processes", "2"]
        + ["--devices_per_process", "1", "--", "python", "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(60, launcher.kill)  # never hang the test run
    timer.start()
    try:
        lines = []
        while sum(line.startswith(f"[{i}] ready {i}") for line in lines for i in range(2)) < 2:
            line = launcher.stdout.readline()
            assert line, "launcher ended early: " + launcher.stderr.read()
            lines.append(line)
        os.kill(launcher.pid, signal.SIGTERM)
        rest, errors = launcher.communicate()
    finally:
        timer.cancel()
    assert launcher.returncode == 0, errors
    assert {"[0] stopping", "[1] stopping"} <= set(rest.splitlines())
    assert "SIGTERM: passing SIGTERM on to every process" in errors
