r"""Train or evaluate on a Cloud TPU VM slice: create it, copy this working tree to every host,
install, run one command on all hosts, stream its log, delete the slice.

    python -m scripts.tpu_pod launch --name NAME --zone ZONE --accelerator_type v4-32 \
        [--spot | --queued [--spot | --best_effort]] [--keep] [--dry_run] -- \
        python -m scripts.train --config configs/clip_hetxl.py:files=gs://B/pairs-*.tfrecord \
        --workdir gs://B/runs/clip_hetxl

Subcommands (all take --name, --zone, [--project], [--dry_run]):
  create   the slice: `tpu-vm create`, or with --queued a queued resource, waited for until
           ACTIVE (--spot, --best_effort, --valid_until_duration);
  run      copy the working tree (git's tracked and untracked-but-not-ignored files, edits
           included) to every host, install it in a virtual environment there (requirements.txt
           with jax[tpu] at the pinned jax version), start the command on every host in the
           background (it survives a dropped ssh connection), then stream host 0's log until the
           command ends; --skip_setup reuses the last copy, --detach returns after the start;
  logs     stream the log of the running or last command again (--worker N or all);
  stop     SIGTERM to the command on every host, as a preemption (the trainer checkpoints and
           exits 0), then follow the log to its end; Ctrl-C during run or launch does the same;
  delete   delete the slice (--queued: the queued resource and its slice);
  launch   create, run, then delete, also after a failure or Ctrl-C (not with --keep).

--dry_run prints every command in order, one per line, and runs none. The command after `--`
runs in the copy's folder on every host; a leading `python` becomes the environment's Python.
JAX finds the slice's hosts itself (scripts/distributed.py). Every host must read the same data
and write the same workdir, so both belong in a gs:// bucket on a multi-host slice.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runtime images for JAX, per TPU generation (Cloud TPU's "TPU software versions" page).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Files of the run on each host, inside the copy's folder.
RUN_LOG, RUN_PID, RUN_STATUS = "run.log", "run.pid", "run.status"
# An ssh that lost its connection exits 255; anything else is the remote command's status.
SSH_CONNECTION_LOST = 255
LOG_REATTACH_ATTEMPTS = 5
QUEUE_POLL_S = 30


def slice_hosts(accelerator_type: str) -> int | None:
    """Number of TPU VM hosts of an accelerator type, None if the family is unknown.

    The number in the name counts TensorCores for v2-v4 and v5p (v2/v3: 8 per host; v4, v5p: 2
    per chip, 4 chips per host) and chips for v5e and v6e (8 on a single host, else 4 per host).
    """
    family, _, size = accelerator_type.rpartition("-")
    if not size.isdigit():
        return None
    count = int(size)
    if family in ("v2", "v3", "v4", "v5p"):
        return max(1, count // 8)
    if family in ("v5litepod", "v6e"):
        return 1 if count <= 8 else count // 4
    return None


def default_runtime_version(accelerator_type: str) -> str:
    family = accelerator_type.rpartition("-")[0]
    if family not in RUNTIME_VERSIONS:
        raise ValueError(
            f"no default --version for accelerator type {accelerator_type!r}; give one "
            f"(known families: {', '.join(RUNTIME_VERSIONS)})"
        )
    return RUNTIME_VERSIONS[family]


def pinned_jax_version(requirements: Path = REPO / "requirements.txt") -> str:
    """The jax version requirements.txt pins; jaxlib must carry the same pin."""
    pins = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.lower() in ("jax", "jaxlib"):
            pins[name.lower()] = version.strip()
    if "jax" not in pins or pins.get("jaxlib") != pins["jax"]:
        raise ValueError(f"{requirements} must pin jax and jaxlib to one version, found {pins}")
    return pins["jax"]


def workdir_of(command: list[str]) -> str | None:
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.partition("=")[2]
    return None


# ----------------------------------------------------------------------------------------------
# What runs on each host. Every string is one line of sh, joined with "; " after `set -e`
# (so that --dry_run prints one command per line), every value quoted with shlex.quote.


def _refuse_while_running() -> str:
    return (
        f'if test -f {RUN_PID} && kill -0 "$(cat {RUN_PID})" 2>/dev/null; then '
        f'echo "$(hostname): a command started here is still running (pid $(cat {RUN_PID}))" >&2; '
        "exit 1; fi"
    )


def setup_script(remote_dir: str, archive_name: str, python: str, jax_version: str) -> str:
    """Replace the copy in remote_dir (keeping its .venv and the last run's files), then
    install. jaxlib is the same wheel on every platform, the TPU runtime comes in libtpu: so
    requirements.txt is installed without its jax and jaxlib lines, together with
    jax[tpu]==<pin>, whose extra pins jaxlib to the same version and adds the matching libtpu,
    all in one resolution, so nothing installs jax twice or at another version."""
    folder, venv = shlex.quote(remote_dir), ".venv"
    packages = f"{python} {python}-venv"
    steps = [
        "set -e",
        f"mkdir -p {folder}",
        f"cd {folder}",
        _refuse_while_running(),
        f"find . -mindepth 1 -maxdepth 1 ! -name {venv} ! -name 'run.*' -exec rm -rf {{}} +",
        f'tar -xzf "$HOME"/{shlex.quote(archive_name)}',
        f'rm -f "$HOME"/{shlex.quote(archive_name)}',
        # requirements.txt is pinned for Python 3.11, which Ubuntu 22.04 images install from
        # apt; the first boot's unattended upgrades may hold the dpkg lock for a while.
        f"test -x {venv}/bin/pip || {python} -m venv {venv} || "
        f"{{ sudo apt-get -q -o DPkg::Lock::Timeout=600 update && "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "
        f"install {packages} && rm -rf {venv} && {python} -m venv {venv}; }}",
        f"{venv}/bin/pip install -q --upgrade pip",
        "grep -v -E '^(jax|jaxlib)==' requirements.txt > requirements-tpu.txt",
        f"{venv}/bin/pip install -q -r requirements-tpu.txt "
        f"{shlex.quote(f'jax[tpu]=={jax_version}')}",
        f"{venv}/bin/pip install -q --no-deps -r requirements-nodeps.txt",
    ]
    return "; ".join(steps)


def remote_argv(command: list[str], env: list[str]) -> list[str]:
    """The command as it runs on a host: `python` is the environment's, `env` sets variables."""
    argv = list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = ".venv/bin/python"
    return (["env", *env] if env else []) + argv


def start_script(remote_dir: str, argv: list[str]) -> str:
    """Start argv in the background, detached from the ssh session (setsid, nohup, no
    terminal), so it survives a dropped connection; its output goes to run.log, its pid to
    run.pid, its exit status to run.status when it ends."""
    wrapper = f"{shlex.join(argv)}; echo $? > {RUN_STATUS}"
    return "; ".join(
        [
            "set -e",
            f"cd {shlex.quote(remote_dir)}",
            _refuse_while_running(),
            f"rm -f {RUN_STATUS} {RUN_PID}",
            f"setsid nohup bash -c {shlex.quote(wrapper)} > {RUN_LOG} 2>&1 < /dev/null & "
            f"echo $! > {RUN_PID}",
            f'echo "$(hostname): started $(cat {RUN_PID})"',
        ]
    )


def logs_script(remote_dir: str) -> str:
    """Print run.log from the start, follow it while the command runs, then exit with the
    command's status (1 if it died without writing one)."""
    return "; ".join(
        [
            f"cd {shlex.quote(remote_dir)}",
            f'test -f {RUN_PID} || {{ echo "$(hostname): no command was started in '
            f'{remote_dir}" >&2; exit 1; }}',
            f'tail -n +1 --pid="$(cat {RUN_PID})" -f {RUN_LOG} | sed -u "s/^/[$(hostname)] /"',
            f'exit "$(cat {RUN_STATUS} 2>/dev/null || echo 1)"',
        ]
    )


def stop_script(remote_dir: str) -> str:
    """SIGTERM to the command (the child of the wrapper in run.pid): on every host at once, the
    trainer agrees on a step through JAX's preemption service, saves a checkpoint, exits 0."""
    return "; ".join(
        [
            f"cd {shlex.quote(remote_dir)}",
            f'if test -f {RUN_PID}; then pkill -TERM -P "$(cat {RUN_PID})" || true; fi',
        ]
    )


# ----------------------------------------------------------------------------------------------
# gcloud commands (flags as in the gcloud reference: compute tpus tpu-vm create/ssh/scp/delete,
# compute tpus queued-resources create/describe/delete).


class Slice:
    """The gcloud commands for one slice (or queued resource) NAME in ZONE."""

    def __init__(self, args: argparse.Namespace):
        self.name, self.zone, self.project = args.name, args.zone, args.project
        self.queued = getattr(args, "queued", False) or getattr(args, "best_effort", False)

    def _tpus(self, *words: str, alpha: bool = False) -> list[str]:
        """gcloud [alpha] compute tpus WORDS --zone=Z [--project=P]"""
        project = [f"--project={self.project}"] if self.project else []
        group = ["gcloud", "alpha"] if alpha else ["gcloud"]
        return [*group, "compute", "tpus", *words, f"--zone={self.zone}", *project]

    def create(
        self,
        accelerator_type: str,
        version: str,
        spot: bool,
        best_effort: bool,
        valid_until_duration: str | None,
        extra_flags: list[str],
    ) -> list[str]:
        spot_flag = ["--spot"] if spot else []
        if not self.queued:
            return self._tpus("tpu-vm", "create", self.name) + [
                f"--accelerator-type={accelerator_type}",
                f"--version={version}",
                *spot_flag,
                *extra_flags,
            ]
        # --best-effort exists only in the alpha command group.
        return self._tpus("queued-resources", "create", self.name, alpha=best_effort) + [
            f"--node-id={self.name}",
            f"--accelerator-type={accelerator_type}",
            f"--runtime-version={version}",
            *spot_flag,
            *(["--best-effort"] if best_effort else []),
            *([f"--valid-until-duration={valid_until_duration}"] if valid_until_duration else []),
            *extra_flags,
        ]

    def queue_state(self) -> list[str]:
        describe = self._tpus("queued-resources", "describe", self.name)
        return describe + ["--format=value(state.state)"]

    def scp(self, local: str, remote: str) -> list[str]:
        # --quiet: no prompts (gcloud makes an ssh key without passphrase if there is none).
        copy = self._tpus("tpu-vm", "scp", local, f"{self.name}:{remote}")
        return copy + ["--worker=all", "--quiet"]

    def ssh(self, script: str, worker: str = "all") -> list[str]:
        login = self._tpus("tpu-vm", "ssh", self.name)
        return login + [f"--worker={worker}", "--quiet", f"--command={script}"]

    def delete(self) -> list[str]:
        if self.queued:
            # --force deletes the slice the queued resource holds, then the resource.
            return self._tpus("queued-resources", "delete", self.name) + ["--force", "--quiet"]
        return self._tpus("tpu-vm", "delete", self.name) + ["--quiet"]


def pack_command(archive: str, repo: Path = REPO) -> list[str]:
    """Tar the working tree as git sees it: tracked files with their uncommitted edits and
    untracked files that are not ignored (no .venv, workdirs, caches). A tracked file deleted
    in the tree is skipped with a warning."""
    root = shlex.quote(str(repo))
    return [
        "bash",
        "-c",
        f"set -o pipefail; git -C {root} ls-files -z --cached --others --exclude-standard | "
        f"tar -C {root} -czf {shlex.quote(archive)} --null --files-from=- --ignore-failed-read",
    ]


# ----------------------------------------------------------------------------------------------


class Runner:
    """Runs commands, or with dry_run only prints them (stdout, one per line)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str], capture: bool = False) -> subprocess.CompletedProcess:
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return subprocess.CompletedProcess(argv, 0, stdout="")
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        return subprocess.run(argv, text=True, capture_output=capture)

    def check(self, argv: list[str]) -> None:
        result = self(argv)
        if result.returncode != 0:
            raise SystemExit(f"tpu_pod: failed ({result.returncode}): {shlex.join(argv)}")


def wait_until_active(run: Runner, tpu: Slice) -> None:
    """Poll the queued resource until its slice exists (ACTIVE); fail on FAILED / SUSPENDED."""
    command = tpu.queue_state()
    if run.dry_run:
        run(command)  # shown once; it is repeated every QUEUE_POLL_S s until ACTIVE
        return
    last = None
    while True:
        result = run(command, capture=True)
        state = result.stdout.strip() if result.returncode == 0 else f"unknown ({result.stderr})"
        if state != last:
            print(f"tpu_pod: queued resource {tpu.name}: {state}", file=sys.stderr, flush=True)
            last = state
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise SystemExit(f"tpu_pod: queued resource {tpu.name} is {state}")
        time.sleep(QUEUE_POLL_S)


def create(args: argparse.Namespace, run: Runner) -> None:
    tpu = Slice(args)
    version = args.version or default_runtime_version(args.accelerator_type)
    run.check(
        tpu.create(
            args.accelerator_type,
            version,
            args.spot,
            args.best_effort,
            args.valid_until_duration,
            args.create_flag,
        )
    )
    if tpu.queued:
        wait_until_active(run, tpu)


def warn_about_workdir(command: list[str], hosts: int | None) -> None:
    workdir = workdir_of(command)
    if workdir is None or workdir.startswith("gs://") or hosts == 1:
        return
    size = f"a {hosts}-host slice" if hosts else "a slice of several hosts"
    print(
        f"tpu_pod: warning: --workdir {workdir} is not a gs:// bucket: on {size} every host "
        "would write its own local copy and none would hold the whole checkpoint",
        file=sys.stderr,
    )


def stream_logs(run: Runner, tpu: Slice, remote_dir: str, worker: str) -> int:
    """Follow the log until the command ends; reattach when the ssh connection drops."""
    for attempt in range(LOG_REATTACH_ATTEMPTS):
        code = run(tpu.ssh(logs_script(remote_dir), worker)).returncode
        if code != SSH_CONNECTION_LOST or run.dry_run:
            return code
        print(
            f"tpu_pod: ssh connection lost ({attempt + 1}/{LOG_REATTACH_ATTEMPTS}); the command "
            "keeps running; reattaching",
            file=sys.stderr,
        )
        time.sleep(QUEUE_POLL_S)
    return SSH_CONNECTION_LOST


def run_command(args: argparse.Namespace, run: Runner, hosts: int | None = None) -> int:
    tpu = Slice(args)
    warn_about_workdir(args.command, hosts)
    if not args.skip_setup:
        archive_name = f"{Path(args.remote_dir).name}-code.tar.gz"
        archive = str(Path(tempfile.gettempdir()) / f"{args.name}-code.tar.gz")
        run.check(pack_command(archive))
        run.check(tpu.scp(archive, archive_name))
        script = setup_script(args.remote_dir, archive_name, args.python, pinned_jax_version())
        run.check(tpu.ssh(script))
    run.check(tpu.ssh(start_script(args.remote_dir, remote_argv(args.command, args.env))))
    if args.detach:
        return 0
    try:
        code = stream_logs(run, tpu, args.remote_dir, "0")
    except KeyboardInterrupt:
        code = stop(args, run, interrupted=True)
    if code != 0:
        print(
            f"tpu_pod: the command failed ({code}); every host's log: python -m scripts.tpu_pod "
            f"logs --name {args.name} --zone {args.zone} --worker all",
            file=sys.stderr,
        )
    return code


def stop(args: argparse.Namespace, run: Runner, interrupted: bool = False) -> int:
    """Stop the command on every host as a preemption would, then follow the log to its end."""
    tpu = Slice(args)
    if interrupted:
        print(
            "tpu_pod: Ctrl-C: sending SIGTERM to the command on every host (the trainer saves "
            "a checkpoint); Ctrl-C again to stop waiting for it",
            file=sys.stderr,
            flush=True,
        )
    run(tpu.ssh(stop_script(args.remote_dir)))
    return stream_logs(run, tpu, args.remote_dir, "0")


def launch(args: argparse.Namespace, run: Runner) -> int:
    tpu = Slice(args)
    try:
        # Nothing to delete when creating fails: the name may be an existing slice's.
        create(args, run)
    except KeyboardInterrupt:
        print(
            f"tpu_pod: interrupted while creating {args.name}; if it exists, delete it with: "
            f"{shlex.join(tpu.delete())}",
            file=sys.stderr,
        )
        raise
    try:
        return run_command(args, run, slice_hosts(args.accelerator_type))
    finally:
        if args.keep:
            print(
                f"tpu_pod: kept {args.name}; delete it with: {shlex.join(tpu.delete())}",
                file=sys.stderr,
            )
        else:
            run(tpu.delete())


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tpu_pod",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="subcommand", required=True)

    def subcommand(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
        sub.add_argument("--zone", required=True)
        sub.add_argument("--project", default=None, help="default: gcloud's core/project")
        sub.add_argument("--dry_run", action="store_true", help="print the commands only")
        return sub

    def creation_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--accelerator_type", required=True, help="v4-32, v5litepod-16, ...")
        sub.add_argument("--version", default=None, help="TPU runtime (default: per family)")
        sub.add_argument("--spot", action="store_true", help="Spot VMs (preemptible)")
        sub.add_argument("--queued", action="store_true", help="through a queued resource")
        sub.add_argument(
            "--best_effort", action="store_true", help="queued, best-effort tier (gcloud alpha)"
        )
        sub.add_argument(
            "--valid_until_duration", default=None, help="queued: give up after, e.g. 6h"
        )
        sub.add_argument(
            "--create_flag",
            action="append",
            default=[],
            metavar="--FLAG=VALUE",
            help="passed to gcloud's create as is, e.g. --create_flag=--service-account=SA "
            "(repeatable)",
        )

    def queued_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--queued", action="store_true", help="created as a queued resource")

    def run_flags(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--remote_dir", default="hetxl", help="folder under each host's home")
        sub.add_argument("--python", default="python3.11", help="interpreter of the venv")
        sub.add_argument(
            "--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
        )
        sub.add_argument("--skip_setup", action="store_true", help="reuse the last copy")
        sub.add_argument("--detach", action="store_true", help="do not follow the log")

    creation_flags(subcommand("create", "create the slice"))
    run_flags(subcommand("run", "copy, install and run a command on every host"))
    logs = subcommand("logs", "stream the log of the last command")
    logs.add_argument("--remote_dir", default="hetxl")
    logs.add_argument("--worker", default="0", help="host index, or all")
    stop_parser = subcommand("stop", "SIGTERM the command on every host, follow it to its end")
    stop_parser.add_argument("--remote_dir", default="hetxl")
    queued_flag(subcommand("delete", "delete the slice"))
    launch_parser = subcommand("launch", "create, run, delete")
    creation_flags(launch_parser)
    run_flags(launch_parser)
    launch_parser.add_argument("--keep", action="store_true", help="do not delete at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = command
    if args.subcommand in ("run", "launch") and not command:
        parser.error(f"{args.subcommand} needs the command to run after --")
    if args.subcommand not in ("run", "launch") and command:
        parser.error(f"{args.subcommand} takes no command after --")
    for item in getattr(args, "env", []):
        if "=" not in item or item.startswith("="):
            parser.error(f"--env {item!r} is not KEY=VALUE")
    if args.subcommand in ("create", "launch"):
        try:
            default_runtime_version(args.accelerator_type) if args.version is None else None
        except ValueError as error:
            parser.error(str(error))
    run = Runner(args.dry_run)
    if args.subcommand == "create":
        create(args, run)
        return 0
    if args.subcommand == "run":
        return run_command(args, run)
    if args.subcommand == "logs":
        return stream_logs(run, Slice(args), args.remote_dir, args.worker)
    if args.subcommand == "stop":
        return stop(args, run)
    if args.subcommand == "delete":
        return run(Slice(args).delete()).returncode
    return launch(args, run)


if __name__ == "__main__":
    sys.exit(main())
