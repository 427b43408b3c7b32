"""scripts.tpu_pod: the gcloud commands it would run, and the shell it runs on every host.

The host-side scripts are run here by bash in a temporary folder standing in for a host's home.
"""

from __future__ import annotations

import io
import shlex
import shutil
import subprocess
import sys
import tarfile

import jax
import pytest

from scripts import tpu_pod

NAME, ZONE = "hx", "us-central2-b"
TRAIN = [
    "python",
    "-m",
    "scripts.train",
    "--config",
    "configs/clip_hetxl.py:files=gs://bucket/pairs-*.tfrecord",
    "--workdir",
    "gs://bucket/runs/it's here",
    "--config.optim.lr=1e-3",
]
needs_host_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "setsid", "nohup", "tail", "pkill", "git")),
    reason="needs bash, setsid, nohup, GNU tail, pkill and git",
)


def shell_words(script: str) -> list[str]:
    """Words and operators of a line of sh, as the shell splits them."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def dry_run(capsys, *argv: str, command: list[str] | None = None) -> tuple[list[str], str]:
    args = [*argv, "--name", NAME, "--zone", ZONE, "--dry_run"]
    assert tpu_pod.main(args + (["--", *command] if command else [])) == 0
    out, err = capsys.readouterr()
    return out.splitlines(), err


@pytest.fixture
def no_process(monkeypatch):
    """A dry run must not start a single process."""

    def refuse(argv, **kwargs):
        raise AssertionError(f"a dry run ran {argv}")

    monkeypatch.setattr(tpu_pod.subprocess, "run", refuse)


def remote_script(line: str) -> str:
    """The host-side script of a printed `gcloud ... ssh ... --command=SCRIPT` line."""
    (script,) = [t[len("--command=") :] for t in shlex.split(line) if t.startswith("--command=")]
    return script


def test_launch_prints_every_command_in_order(capsys, no_process):
    lines, _ = dry_run(capsys, "launch", "--accelerator_type", "v4-32", "--spot", command=TRAIN)
    assert lines[0] == (
        "gcloud compute tpus tpu-vm create hx --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"
    )
    assert lines[1].startswith("bash -c 'set -o pipefail; git -C ")
    archive = f"{tpu_pod.tempfile.gettempdir()}/hx-code.tar.gz"
    assert lines[2] == (
        f"gcloud compute tpus tpu-vm scp {archive} hx:hetxl-code.tar.gz --zone=us-central2-b "
        "--worker=all --quiet"
    )
    ssh = "gcloud compute tpus tpu-vm ssh hx --zone=us-central2-b"
    assert [line.split(" --quiet")[0] for line in lines[3:6]] == [
        f"{ssh} --worker=all",  # install
        f"{ssh} --worker=all",  # start
        f"{ssh} --worker=0",  # follow host 0's log
    ]
    assert remote_script(lines[5]) == tpu_pod.logs_script("hetxl")
    assert lines[6] == "gcloud compute tpus tpu-vm delete hx --zone=us-central2-b --quiet"
    assert len(lines) == 7


def test_keep_leaves_the_slice_and_says_how_to_delete_it(capsys, no_process):
    lines, err = dry_run(
        capsys, "launch", "--accelerator_type", "v4-8", "--keep", "--project", "p", command=TRAIN
    )
    assert not any(" delete " in line for line in lines)
    assert "tpu_pod: kept hx; delete it with: gcloud compute tpus tpu-vm delete hx" in err
    assert all("--project=p" in line for line in lines if line.startswith("gcloud"))


def test_queued_spot_waits_for_the_resource_and_deletes_it_with_force(capsys, no_process):
    lines, _ = dry_run(
        capsys,
        "launch",
        "--accelerator_type",
        "v5litepod-16",
        "--queued",
        "--spot",
        "--valid_until_duration",
        "6h",
        command=TRAIN,
    )
    assert lines[0] == (
        "gcloud compute tpus queued-resources create hx --zone=us-central2-b --node-id=hx "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot "
        "--valid-until-duration=6h"
    )
    assert lines[1] == (
        "gcloud compute tpus queued-resources describe hx --zone=us-central2-b "
        "'--format=value(state.state)'"
    )
    assert lines[-1] == (
        "gcloud compute tpus queued-resources delete hx --zone=us-central2-b --force --quiet"
    )


def test_best_effort_uses_the_alpha_queued_resources(capsys, no_process):
    lines, _ = dry_run(
        capsys,
        "create",
        "--accelerator_type",
        "v5p-16",
        "--best_effort",
        "--create_flag=--service-account=sa@p.iam.gserviceaccount.com",
    )
    assert lines == [
        "gcloud alpha compute tpus queued-resources create hx --zone=us-central2-b --node-id=hx "
        "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --best-effort "
        "--service-account=sa@p.iam.gserviceaccount.com",
        "gcloud compute tpus queued-resources describe hx --zone=us-central2-b "
        "'--format=value(state.state)'",
    ]


def test_run_delete_logs_and_stop(capsys, no_process):
    lines, _ = dry_run(capsys, "run", "--skip_setup", "--detach", command=TRAIN)
    assert len(lines) == 1 and " ssh hx " in lines[0]
    lines, _ = dry_run(capsys, "delete")
    assert lines == ["gcloud compute tpus tpu-vm delete hx --zone=us-central2-b --quiet"]
    lines, _ = dry_run(capsys, "logs", "--worker", "all")
    assert len(lines) == 1 and "--worker=all" in lines[0]
    lines, _ = dry_run(capsys, "stop")
    assert remote_script(lines[0]) == tpu_pod.stop_script("hetxl")
    assert remote_script(lines[1]) == tpu_pod.logs_script("hetxl")


def test_the_printed_start_command_parses_back_to_the_intended_command(capsys, no_process):
    # String-valued keys, so that the config still loads with them.
    tricky = [
        *TRAIN,
        "--config.init_from=a b",
        "--config.input.source.files=$HOME `x` \"q\" 'r'; echo no",
    ]
    lines, _ = dry_run(capsys, "run", "--env", "A=1 2", command=tricky)
    start = lines[3]  # after packing, copying and installing
    script = remote_script(start)
    assert script == tpu_pod.start_script("hetxl", tpu_pod.remote_argv(tricky, ["A=1 2"]))
    # The host's shell runs `bash -c WRAPPER`; WRAPPER runs the command, then records its status.
    words = shell_words(script)
    wrapper = words[words.index("-c") + 1]
    command = shell_words(wrapper)
    argv = command[: command.index(";")]
    assert argv == ["env", "A=1 2", ".venv/bin/python", *tricky[1:]]
    assert command[command.index(";") :] == [";", "echo", "$?", ">", "run.status"]


def test_install_keeps_jaxlib_at_the_pin_and_adds_the_tpu_runtime(capsys, no_process):
    lines, _ = dry_run(capsys, "run", command=TRAIN)
    setup = remote_script(lines[2])
    pin = tpu_pod.pinned_jax_version()
    assert pin == jax.__version__
    steps = setup.split("; ")
    assert "grep -v -E '^(jax|jaxlib)==' requirements.txt > requirements-tpu.txt" in steps
    assert f".venv/bin/pip install -q -r requirements-tpu.txt 'jax[tpu]=={pin}'" in steps


def test_missing_or_bad_arguments_are_named(capsys, no_process):
    with pytest.raises(SystemExit):
        tpu_pod.main(["create", "--zone", ZONE, "--accelerator_type", "v4-32", "--dry_run"])
    assert "the following arguments are required: --name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu_pod.main(["launch", "--name", NAME, "--zone", ZONE, "--dry_run", "--", *TRAIN])
    assert "--accelerator_type" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu_pod.main(["run", "--name", NAME, "--zone", ZONE, "--dry_run"])
    assert "run needs the command to run after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu_pod.main(["create", "--name", NAME, "--zone", ZONE, "--accelerator_type", "x9-8"])
    assert "no default --version for accelerator type 'x9-8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tpu_pod.main(["run", "--name", NAME, "--zone", ZONE, "--env", "A", "--", *TRAIN])
    assert "--env 'A' is not KEY=VALUE" in capsys.readouterr().err


def test_a_local_workdir_on_a_multi_host_slice_is_warned_about_before_anything_is_created(
    capsys, monkeypatch, no_process
):
    local = [*TRAIN[:5], "--workdir", "runs/local"]
    # Both streams into one, to see the warning's place among the printed commands.
    merged = io.StringIO()
    monkeypatch.setattr(sys, "stdout", merged)
    monkeypatch.setattr(sys, "stderr", merged)
    argv = ["launch", "--accelerator_type", "v4-32", "--name", NAME, "--zone", ZONE, "--dry_run"]
    assert tpu_pod.main([*argv, "--", *local]) == 0
    lines = merged.getvalue().splitlines()
    assert "--workdir runs/local is not a gs:// bucket: on a 4-host slice" in lines[0]
    assert lines[1].startswith("gcloud compute tpus tpu-vm create")
    monkeypatch.undo()
    _, err = dry_run(capsys, "launch", "--accelerator_type", "v4-8", command=local)
    assert "warning" not in err
    _, err = dry_run(capsys, "launch", "--accelerator_type", "v4-32", command=TRAIN)
    assert "warning" not in err


def test_slice_hosts():
    hosts = {t: tpu_pod.slice_hosts(t) for t in ("v4-8", "v4-32", "v5p-16", "v5litepod-8")}
    assert hosts == {"v4-8": 1, "v4-32": 4, "v5p-16": 2, "v5litepod-8": 1}
    assert tpu_pod.slice_hosts("v5litepod-16") == 4 and tpu_pod.slice_hosts("v6e-256") == 64
    assert tpu_pod.slice_hosts("x9-8") is None


class Recorder(tpu_pod.Runner):
    """Records commands; the first wait for the log is interrupted by Ctrl-C."""

    def __init__(self):
        super().__init__(dry_run=False)
        self.commands, self.interrupted = [], False

    def __call__(self, argv, capture=False):
        self.commands.append(argv)
        if argv[-1] == f"--command={tpu_pod.logs_script('hetxl')}" and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(argv, 0, stdout="")


def test_ctrl_c_stops_the_command_on_every_host_before_the_slice_goes(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(tpu_pod, "Runner", lambda dry_run: recorder)
    argv = ["launch", "--name", NAME, "--zone", ZONE, "--accelerator_type", "v4-32"]
    assert tpu_pod.main([*argv, "--skip_setup", "--", *TRAIN]) == 0
    scripts = [c[-1] for c in recorder.commands]
    logs = f"--command={tpu_pod.logs_script('hetxl')}"
    stop = f"--command={tpu_pod.stop_script('hetxl')}"
    assert scripts[-4:] == [logs, stop, logs, "--quiet"]
    assert recorder.commands[-1][4] == "delete"
    assert "--worker=all" in recorder.commands[-3]


# ----------------------------------------------------------------------------------------------
# The host-side scripts, run by bash here.


def run_bash(script: str, home, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", "-c", script],
        cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@needs_host_tools
def test_the_host_runs_the_command_detached_and_the_log_ends_with_its_status(tmp_path):
    (tmp_path / "hetxl/.venv/bin").mkdir(parents=True)
    (tmp_path / "hetxl/.venv/bin/python").symlink_to(sys.executable)
    code = "import sys; print('args', sys.argv[1:]); sys.exit(3)"
    argv = tpu_pod.remote_argv(["python", "-c", code, "a b", "$HOME", "*"], [])
    started = run_bash(tpu_pod.start_script("hetxl", argv), tmp_path)
    assert started.returncode == 0 and "started" in started.stdout, started.stderr
    logs = run_bash(tpu_pod.logs_script("hetxl"), tmp_path)
    assert logs.returncode == 3
    assert logs.stdout.endswith("] args ['a b', '$HOME', '*']\n")


@needs_host_tools
def test_stop_sends_sigterm_and_a_second_start_is_refused_meanwhile(tmp_path):
    (tmp_path / "hetxl/.venv/bin").mkdir(parents=True)
    (tmp_path / "hetxl/.venv/bin/python").symlink_to(sys.executable)
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('saved', flush=True), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    start = tpu_pod.start_script("hetxl", tpu_pod.remote_argv(["python", "-c", code], []))
    assert run_bash(start, tmp_path).returncode == 0
    again = run_bash(start, tmp_path)
    assert again.returncode == 1 and "still running" in again.stderr
    for _ in range(100):  # until the handler is installed
        if "ready" in (tmp_path / "hetxl/run.log").read_text():
            break
        subprocess.run(["sleep", "0.1"])
    assert run_bash(tpu_pod.stop_script("hetxl"), tmp_path).returncode == 0
    logs = run_bash(tpu_pod.logs_script("hetxl"), tmp_path)
    assert logs.returncode == 0
    assert [line.split("] ")[1] for line in logs.stdout.splitlines()] == ["ready", "saved"]


@needs_host_tools
def test_setup_replaces_the_copy_keeps_the_environment_and_installs_at_the_pin(tmp_path):
    # A small repository: a tracked file with an uncommitted edit, an untracked file, an
    # ignored one.
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "requirements.txt").write_text("jax==0.10.2\njaxlib==0.10.2\nnumpy==2.4.6\n")
    (repo / "requirements-nodeps.txt").write_text("data-only==1.0\n")
    (repo / ".gitignore").write_text("ignored.txt\n")
    (repo / "tracked.py").write_text("old\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    (repo / "tracked.py").write_text("edited\n")
    (repo / "untracked.py").write_text("new\n")
    (repo / "ignored.txt").write_text("secret\n")

    home = tmp_path / "home"
    home.mkdir()
    archive = home / "hetxl-code.tar.gz"
    packed = subprocess.run(tpu_pod.pack_command(str(archive), repo), capture_output=True)
    assert packed.returncode == 0, packed.stderr
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(
            [".gitignore", "requirements-nodeps.txt", "requirements.txt", "tracked.py"]
            + ["untracked.py"]
        )

    # The host already holds an environment, the last run's log and a stale file: a pip that
    # only writes down how it was called stands in for the real one.
    venv_bin = home / "hetxl/.venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "pip").write_text('#!/bin/bash\necho "$@" >> "$HOME/pip-calls"\n')
    (venv_bin / "pip").chmod(0o755)
    (home / "hetxl/run.log").write_text("last run\n")
    (home / "hetxl/stale.py").write_text("deleted upstream\n")

    script = tpu_pod.setup_script("hetxl", archive.name, "python3.11", "0.10.2")
    result = run_bash(script, home)
    assert result.returncode == 0, result.stderr
    copy = home / "hetxl"
    assert (copy / "tracked.py").read_text() == "edited\n"
    assert (copy / "untracked.py").exists() and not (copy / "stale.py").exists()
    assert (copy / "run.log").read_text() == "last run\n" and (venv_bin / "pip").exists()
    assert not archive.exists()
    assert (copy / "requirements-tpu.txt").read_text() == "numpy==2.4.6\n"
    assert (home / "pip-calls").read_text().splitlines() == [
        "install -q --upgrade pip",
        "install -q -r requirements-tpu.txt jax[tpu]==0.10.2",
        "install -q --no-deps -r requirements-nodeps.txt",
    ]


@pytest.mark.parametrize(
    "config_args, message",
    [
        (["--config", "configs/clip_hetxl.py:file=gs://b/x"], "config arg 'file=gs://b/x'"),
        ([*TRAIN[3:5], "--config.optim.lrr=1e-3"], "config has no optim.lrr"),
        ([*TRAIN[3:5], "--config.optim.lr", "fast"], "optim.lr"),
        (["--config=configs/clip_hetx.py"], "no config file configs/clip_hetx.py"),
        ([*TRAIN[3:5], "--config.optim.lr"], "--config.optim.lr needs a value"),
    ],
)
def test_a_config_that_does_not_load_stops_the_job_before_anything_is_created(
    capsys, no_process, config_args, message
):
    command = ["python", "-m", "scripts.train", "--workdir", "gs://b/r", *config_args]
    for subcommand in (["launch", "--accelerator_type", "v4-32"], ["run"]):
        argv = [*subcommand, "--name", NAME, "--zone", ZONE, "--dry_run", "--", *command]
        assert tpu_pod.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == ""  # not even the dry run's first command
        assert "nothing was created or copied" in err and message in err, err


def test_a_command_without_a_config_is_not_checked(capsys, no_process):
    lines, _ = dry_run(
        capsys, "run", command=["python", "-m", "scripts.zeroshot_eval", "--workdir", "gs://b/r"]
    )
    assert any("scripts.zeroshot_eval" in line for line in lines)
