"""Multi-process start-up shared by every entry point that trains or evaluates.

    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)  # --coordinator_address, --num_processes, --process_id, ...
    args = parser.parse_args()
    distributed.initialize(args)  # before anything touches a jax device

A plain run (no flags, no cluster around it) stays one process and starts nothing. Otherwise:

- explicit (GPU or CPU hosts, scripts.local_cluster): `--coordinator_address host:port
  --num_processes N --process_id i` on every process, or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (a flag wins over its variable);
- automatic: where JAX finds the job's shape itself (Cloud TPU VMs of a multi-host slice, GKE TPU
  pods, SLURM `srun`, Open MPI `mpirun`), `jax.distributed.initialize()` is called with whatever
  was not given and JAX reads the rest from the cluster.

`initialize` must run before any jax computation, and before jax.devices() or anything else
that starts a backend: the distributed client has to exist when the backend is created, and
jax refuses to start it afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading

# JAX reads the first itself (jax.distributed.initialize falls back to it); the other two are
# the names launchers conventionally export next to it, and scripts.local_cluster sets all three.
COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

# jax.distributed.initialize's own default: long enough for the workers of a pod slice, started
# one ssh session each, to reach the coordinator; bounded, so a missing process fails the job.
DEFAULT_INITIALIZATION_TIMEOUT_S = 300

# Cluster environments whose detection is cheap and reliable (environment variables, or the TPU
# VM metadata server once JAX has seen TPU chips). Kubernetes and mpi4py are left out: their
# checks need extra packages, and a single-process job in a Kubernetes pod must not start a
# coordinator. Names as in jax._src.clusters.
AUTO_DETECTED_CLUSTERS = ("ompi", "slurm", "gketpu", "gcetpu")


@dataclasses.dataclass(frozen=True)
class StartUp:
    """How this process joins the job.

    mode: "single" (one process, nothing to start), "explicit" (all three values known) or
      "auto" (JAX fills in the values that are None from `cluster`).
    cluster: name of the detected cluster environment (jax._src.clusters), or None.
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S

    @property
    def multi_process(self) -> bool:
        return self.mode != "single"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the multi-process flags to an entry point's parser."""
    group = parser.add_argument_group(
        "multi-process",
        "Leave unset for one process, or on a TPU slice / SLURM / Open MPI, where JAX finds "
        "them itself.",
    )
    group.add_argument(
        "--coordinator_address",
        default=None,
        help=f"host:port of process 0, reachable from every process (${COORDINATOR_ADDRESS_ENV})",
    )
    group.add_argument(
        "--num_processes",
        type=int,
        default=None,
        help=f"number of processes in the job (${NUM_PROCESSES_ENV})",
    )
    group.add_argument(
        "--process_id",
        type=int,
        default=None,
        help=f"this process's index, 0 .. num_processes - 1 (${PROCESS_ID_ENV})",
    )
    group.add_argument(
        "--initialization_timeout",
        type=int,
        default=DEFAULT_INITIALIZATION_TIMEOUT_S,
        help="seconds to wait for all processes to join before failing (default %(default)s)",
    )


def _int_setting(value: int | None, flag: str, env_name: str, environ) -> tuple[int | None, str]:
    """The flag's value, else the environment variable's, with where it came from."""
    if value is not None:
        return value, flag
    raw = environ.get(env_name, "").strip()
    if not raw:
        return None, flag
    try:
        return int(raw), f"{env_name} (for {flag})"
    except ValueError:
        raise ValueError(f"{env_name}={raw!r} (for {flag}) is not an integer") from None


def _check_address(address: str, source: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{source}={address!r} is not host:port (for example 10.0.0.1:8476)")


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment JAX would use, or None.

    Goes through jax's own cluster environments in jax's order, so that what is detected here
    is what jax.distributed.initialize() then uses. Outside such an environment this reads a
    few environment variables and nothing else (TPU metadata is only asked for on a TPU VM).
    """
    from jax._src import clusters

    for cluster in clusters.ClusterEnv._cluster_types:
        if cluster.opt_in_only_method or not cluster.name:
            continue
        if cluster.name in AUTO_DETECTED_CLUSTERS and cluster.is_env_present():
            return cluster.name, cluster.get_process_count()
    return None


def resolve(args: argparse.Namespace, environ=None, detect=detect_cluster) -> StartUp:
    """Decide from the flags, the environment and the cluster how this process starts.

    Raises ValueError naming the flag (and its environment variable) when the values are
    inconsistent. Starts nothing; `detect` is only called when the flags leave a value open.
    """
    environ = os.environ if environ is None else environ
    timeout = args.initialization_timeout
    if timeout <= 0:
        raise ValueError(f"--initialization_timeout must be positive, got {timeout}")
    coordinator, coordinator_source = args.coordinator_address, "--coordinator_address"
    if not coordinator and environ.get(COORDINATOR_ADDRESS_ENV, "").strip():
        coordinator = environ[COORDINATOR_ADDRESS_ENV].strip()
        coordinator_source = f"{COORDINATOR_ADDRESS_ENV} (for --coordinator_address)"
    num, num_source = _int_setting(
        args.num_processes, "--num_processes", NUM_PROCESSES_ENV, environ
    )
    process_id, id_source = _int_setting(args.process_id, "--process_id", PROCESS_ID_ENV, environ)
    if num is not None and num < 1:
        raise ValueError(f"{num_source} must be at least 1, got {num}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"{id_source} must be 0 or more, got {process_id}")
    if num is not None and process_id is not None and process_id >= num:
        raise ValueError(
            f"{id_source} is {process_id} but must be below {num_source} ({num}): "
            f"process ids run from 0 to {num - 1}"
        )
    if coordinator:
        _check_address(coordinator, coordinator_source)

    if num == 1:  # asked for one process explicitly: a surrounding cluster is ignored
        return StartUp("single", initialization_timeout=timeout)
    if num is not None and coordinator and process_id is not None:
        return StartUp("explicit", coordinator, num, process_id, initialization_timeout=timeout)

    detected = detect()
    if detected is not None and (num is not None or detected[1] > 1 or coordinator):
        return StartUp("auto", coordinator, num, process_id, detected[0], timeout)
    if num is None and coordinator is None and process_id is None:
        return StartUp("single", initialization_timeout=timeout)

    missing = [
        f"{flag} (or {env})"
        for flag, env, value in (
            ("--num_processes", NUM_PROCESSES_ENV, num),
            ("--coordinator_address", COORDINATOR_ADDRESS_ENV, coordinator),
            ("--process_id", PROCESS_ID_ENV, process_id),
        )
        if value is None
    ]
    given = ", ".join(
        f"{source}={value}"
        for source, value in (
            (num_source, num),
            (coordinator_source, coordinator),
            (id_source, process_id),
        )
        if value is not None
    )
    raise ValueError(
        f"a multi-process job needs {' and '.join(missing)} as well (given: {given}); no "
        f"cluster JAX could read them from was detected ({', '.join(AUTO_DETECTED_CLUSTERS)})"
    )


def _exit_at_once_on_uncaught_exception() -> None:
    """Make an uncaught exception end this process now, with status 1.

    At normal exit JAX waits in a shutdown barrier for every other process (up to 300 s) and
    then aborts, so a process that failed would sit there while its peers block in their next
    collective. Exiting at once lets a launcher see the failure and stop the job; peers that
    run on find the process gone at their next collective or heartbeat.
    """
    report = sys.excepthook

    def report_and_exit(kind, value, traceback) -> None:
        report(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = report_and_exit


def initialize(args: argparse.Namespace) -> StartUp:
    """Start jax.distributed when the job has several processes; return how it started.

    Call before any jax computation (see the module docstring). On CPU the cross-process
    collectives use gloo. A bad combination of flags ends the program with a message naming
    the flag (SystemExit); a process that does not join within --initialization_timeout makes
    every process fail.
    """
    try:
        startup = resolve(args)
    except ValueError as error:
        raise SystemExit(f"multi-process start-up: {error}") from None
    if not startup.multi_process:
        return startup

    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Processes on CPU devices talk through gloo (it needs no MPI installation); the setting
        # only concerns the CPU backend, so it is harmless next to GPUs or TPUs.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    where = (
        f"coordinator {startup.coordinator_address}"
        if startup.coordinator_address
        else "the coordinator JAX finds"
    )
    who = (
        f"process {startup.process_id} of {startup.num_processes}"
        if startup.mode == "explicit"
        else f"a {startup.cluster} job"
    )
    print(f"multi-process start-up: {who} joining via {where}", file=sys.stderr, flush=True)
    # XLA aborts the process when not all processes have joined in time, with a message that
    # speaks only of a deadline: say what to check before that happens.
    if startup.mode == "explicit":
        check = (
            f"that every process was started with the same --coordinator_address "
            f"({startup.coordinator_address}) and --num_processes ({startup.num_processes}) "
            "and its own --process_id, and that process 0's host and port are reachable"
        )
    else:
        check = f"that the command was started on every host of the {startup.cluster} job"
    waited = 0.9 * startup.initialization_timeout
    warning = threading.Timer(
        waited,
        lambda: print(
            f"multi-process start-up: still waiting for all processes after {waited:.0f} s, "
            f"giving up at {startup.initialization_timeout} s: check {check}",
            file=sys.stderr,
            flush=True,
        ),
    )
    warning.daemon = True
    warning.start()
    try:
        jax.distributed.initialize(
            coordinator_address=startup.coordinator_address,
            num_processes=startup.num_processes,
            process_id=startup.process_id,
            initialization_timeout=startup.initialization_timeout,
        )
    finally:
        warning.cancel()
    _exit_at_once_on_uncaught_exception()
    connect_cpu_collectives()
    return startup


def connect_cpu_collectives() -> None:
    """On CPU devices, one all-reduce over every device of the job, right after start-up.

    Gloo (the CPU collectives) connects a group of devices at its first collective and gives the
    other processes 30 s to arrive; once connected, a collective waits for its peers as long as
    needed. Processes compile the first step separately, and on a loaded host one can reach it
    more than 30 s after another, which would end the job. Here the processes have just met at
    the coordinator, so the data-parallel group (all devices) connects in time, once.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.default_backend() != "cpu":
        return
    mesh = Mesh(np.array(jax.devices()), ("all",))
    ones = np.ones((jax.local_device_count(),), np.int32)
    spread = multihost_utils.host_local_array_to_global_array(ones, mesh, PartitionSpec("all"))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(spread)
    if int(total.addressable_data(0)) != jax.device_count():
        raise RuntimeError(f"connecting the CPU collectives summed {total}, not the device count")
