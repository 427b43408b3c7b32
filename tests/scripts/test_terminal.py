"""scripts.terminal.run: what an entry point's main returns becomes the program's exit status."""

from __future__ import annotations

import sys

import pytest

from scripts import terminal


@pytest.fixture(autouse=True)
def _restore_unraisable_hook(monkeypatch):
    # run() wraps sys.unraisablehook; monkeypatch puts the original back afterwards.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)


@pytest.mark.parametrize("returned,status", [(None, 0), (0, 0), (1, 1), (3, 3)])
def test_an_int_or_nothing_is_the_exit_status(returned, status):
    assert terminal.run(lambda: returned) == status


def test_a_main_that_returns_its_report_exits_0():
    # zeroshot_eval's main returns its report dict; sys.exit(dict) would print it and exit 1.
    assert terminal.run(lambda: {"top1": 0.5, "step": 2}) == 0


def test_a_config_error_exits_2_with_one_line_per_problem(capsys):
    from data.config_blocks import ConfigError

    def main():
        raise ConfigError(["input.batch_size must be positive", "optim.lr must be positive"])

    assert terminal.run(main) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: invalid config (2 problems):",
        "  input.batch_size must be positive",
        "  optim.lr must be positive",
    ]
