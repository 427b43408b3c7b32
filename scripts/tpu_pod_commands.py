"""The commands scripts.tpu_pod runs, as argument lists and sh strings, built without running any.

gcloud's commands for one slice (`Slice`), the sh scripts that run on every host (set up the
copy, start the command in the background, follow its log, stop it), the local tar of the working
tree, and the facts they need about TPU slices (hosts per accelerator type, runtime images, the
pinned jax version).
"""

from __future__ import annotations

import argparse
import shlex
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
