"""scripts.distributed: where the multi-process settings come from and what is refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import pytest

from scripts import distributed
from scripts.local_cluster import free_port
from tests import REPO

CLUSTER_VARIABLES = (
    distributed.COORDINATOR_ADDRESS_ENV,
    distributed.NUM_PROCESSES_ENV,
    distributed.PROCESS_ID_ENV,
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
)


# What an entry point does first, flags from the command line.
XLA_TWO_DEVICES = "--xla_force_host_platform_device_count=2"

JOIN = """
import argparse, sys
from scripts import distributed
parser = argparse.ArgumentParser()
distributed.add_flags(parser)
distributed.initialize(parser.parse_args(sys.argv[1:]))
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)
    return parser.parse_args(list(argv))


def no_cluster():
    return None


def resolve(*argv: str, env: dict[str, str] | None = None, detect=no_cluster):
    return distributed.resolve(parse(*argv), environ=env or {}, detect=detect)


@pytest.fixture
def clean_environment(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_flags_default_to_unset():
    args = parse()
    assert (args.coordinator_address, args.num_processes, args.process_id) == (None, None, None)
    assert args.initialization_timeout == distributed.DEFAULT_INITIALIZATION_TIMEOUT_S


def test_a_plain_run_is_one_process_and_detection_is_not_asked_twice():
    calls = []

    def detect():
        calls.append(1)
        return None

    assert resolve(detect=detect) == distributed.StartUp("single")
    assert len(calls) == 1


def test_flags_give_an_explicit_start():
    startup = resolve(
        "--coordinator_address", "10.0.0.1:1234", "--num_processes", "4", "--process_id", "3"
    )
    assert startup == distributed.StartUp("explicit", "10.0.0.1:1234", 4, 3)
    assert startup.multi_process


def test_environment_variables_fill_in_missing_flags():
    env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve(env=env) == distributed.StartUp("explicit", "host:99", 2, 1)


def test_a_flag_wins_over_its_environment_variable():
    env = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    startup = resolve(
        "--coordinator_address", "flag:2", "--num_processes", "8", "--process_id", "5", env=env
    )
    assert startup == distributed.StartUp("explicit", "flag:2", 8, 5)


def test_one_process_asked_for_explicitly_ignores_a_surrounding_cluster():
    startup = resolve("--num_processes", "1", detect=lambda: ("slurm", 4))
    assert startup.mode == "single"


def test_a_detected_cluster_of_several_processes_starts_automatically():
    startup = resolve(detect=lambda: ("gcetpu", 4))
    assert startup == distributed.StartUp("auto", cluster="gcetpu")
    # One host of a slice, or a one-task SLURM step: nothing to start.
    assert resolve(detect=lambda: ("gcetpu", 1)).mode == "single"


def test_a_detected_cluster_fills_in_what_the_flags_leave_open():
    startup = resolve("--num_processes", "8", detect=lambda: ("slurm", 8))
    assert startup == distributed.StartUp("auto", None, 8, None, "slurm")


def test_process_id_must_be_below_num_processes():
    with pytest.raises(ValueError, match=r"--process_id is 2 but must be below --num_processes"):
        resolve("--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2")
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "7", "JAX_COORDINATOR_ADDRESS": "h:1"}
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID \(for --process_id\) is 7"):
        resolve(env=env)


def test_several_processes_without_a_coordinator_name_the_missing_flag():
    with pytest.raises(ValueError, match=r"needs --coordinator_address \(or JAX_COORDINATOR"):
        resolve("--num_processes", "2", "--process_id", "0")
    with pytest.raises(ValueError, match=r"needs --process_id \(or JAX_PROCESS_ID\)"):
        resolve("--num_processes", "2", "--coordinator_address", "h:1")
    with pytest.raises(ValueError, match=r"needs --num_processes"):
        resolve("--process_id", "1")


def test_malformed_values_are_named():
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' \(for --num_processes\)"):
        resolve(env={"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match=r"--coordinator_address='10.0.0.1' is not host:port"):
        resolve("--coordinator_address", "10.0.0.1", "--num_processes", "2", "--process_id", "0")
    with pytest.raises(ValueError, match=r"--num_processes must be at least 1"):
        resolve("--num_processes", "0")
    with pytest.raises(ValueError, match=r"--initialization_timeout must be positive"):
        resolve("--initialization_timeout", "0")


def test_initialize_reports_a_bad_flag_and_exits(clean_environment):
    args = parse("--num_processes", "3", "--process_id", "3", "--coordinator_address", "h:1")
    with pytest.raises(SystemExit, match=r"multi-process start-up: --process_id is 3"):
        distributed.initialize(args)
    assert not jax.distributed.is_initialized()


def test_initialize_does_nothing_for_one_process(clean_environment):
    assert distributed.initialize(parse()).mode == "single"
    assert not jax.distributed.is_initialized()


def test_detection_reads_jax_cluster_environments(clean_environment):
    assert distributed.detect_cluster() is None
    for name, value in {
        "SLURM_JOB_ID": "17",
        "SLURM_STEP_NODELIST": "node[001-004]",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
    }.items():
        clean_environment.setenv(name, value)
    assert distributed.detect_cluster() == ("slurm", 4)


def test_a_process_whose_peers_never_come_fails_with_advice_instead_of_hanging():
    # Process 1 of 2, and no process 0 serving the coordinator address.
    command = [
        sys.executable,
        "-c",
        JOIN,
        f"--coordinator_address=127.0.0.1:{free_port()}",
        "--num_processes=2",
        "--process_id=1",
        "--initialization_timeout=3",
    ]
    start = time.monotonic()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "process 1 of 2 joining via coordinator 127.0.0.1:" in result.stderr
    assert "still waiting for all processes" in result.stderr
    assert "--coordinator_address" in result.stderr


LATE_FIRST_STEP = (
    JOIN
    + """
import os, time
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
if jax.process_index() == 1:
    time.sleep(float(os.environ["LATE_BY_S"]))  # a slow compilation of the first step, say
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = np.full((2, 3), jax.process_index() + 1.0, np.float32)
batch = multihost_utils.host_local_array_to_global_array(rows, mesh, PartitionSpec("data"))
mean = jax.jit(lambda x: x.mean(0), out_shardings=NamedSharding(mesh, PartitionSpec()))(batch)
print("mean", float(mean.addressable_data(0)[0]), flush=True)
"""
)


@pytest.mark.slow  # sleeps past gloo's 30 s connection deadline
def test_a_process_that_reaches_its_first_collective_late_does_not_end_the_job():
    # Gloo gives peers 30 s to connect at a group's first collective; start-up connects the
    # group of all devices, so a first step reached 35 s apart must still run.
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_TWO_DEVICES, "LATE_BY_S": "35"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", LATE_FIRST_STEP, f"--coordinator_address={address}"]
            + ["--num_processes=2", f"--process_id={index}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        # Rows of ones from process 0 and twos from process 1, two each: the mean is 1.5.
        assert "mean 1.5" in output, output[-3000:]
