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

Before anything is created or copied, a command that names `--config` (and `--config.a.b=v`
overrides) has that config loaded here: a missing file, an unknown config arg or override key,
or a value of the wrong type exits 2 at once instead of on the slice after minutes of set-up.
Only loading happens here; the full check, which reads the data, runs on the hosts.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.terminal import report_config_problems
from scripts.tpu_pod_commands import (
    Slice,
    default_runtime_version,
    logs_script,
    pack_command,
    pinned_jax_version,
    remote_argv,
    setup_script,
    slice_hosts,
    start_script,
    stop_script,
)

# An ssh that lost its connection exits 255; anything else is the remote command's status.
SSH_CONNECTION_LOST = 255
LOG_REATTACH_ATTEMPTS = 5
QUEUE_POLL_S = 30


def flag_value(command: list[str], flag: str) -> str | None:
    """The value the command gives `flag` ("--flag VALUE" or "--flag=VALUE"; the last one wins,
    as in argparse), None if it gives none."""
    value = None
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.partition("=")[2]
    return value


def config_problems(command: list[str]) -> list[str]:
    """What loading the command's --config with its overrides refuses ([] when it loads or the
    command names no config): checked on this machine, where the working tree that every host
    gets lives."""
    from scripts.config_loader import load_config, split_overrides

    try:
        overrides, rest = split_overrides(command)
    except ValueError as error:
        return [str(error)]
    spec = flag_value(rest, "--config")
    if spec is None:
        return []
    from data.config_blocks import ConfigError

    try:
        load_config(spec, overrides)
    except ConfigError as error:
        return list(error.problems)
    return []


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
    workdir = flag_value(command, "--workdir")
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


def run_command(args: argparse.Namespace, run: Runner) -> int:
    tpu = Slice(args)
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
        return run_command(args, run)
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
    if args.subcommand in ("run", "launch"):
        problems = config_problems(command)
        if problems:
            report_config_problems(
                problems, "the command's config does not load; nothing was created or copied"
            )
            return 2
        hosts = slice_hosts(args.accelerator_type) if args.subcommand == "launch" else None
        warn_about_workdir(command, hosts)
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
