"""scripts.terminal.run: what an entry point's main returns becomes the program's exit status."""

from __future__ import annotations

import argparse
import importlib
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


@pytest.mark.parametrize(
    "parse, text, value",
    [
        (terminal.positive_int, "1", 1),
        (terminal.positive_int, "250", 250),
        (terminal.non_negative_int, "0", 0),
        (terminal.non_negative_int, "7", 7),
    ],
)
def test_integer_flag_types_accept_their_range(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (terminal.positive_int, "0", "must be >= 1, got 0"),
        (terminal.positive_int, "-4", "must be >= 1, got -4"),
        (terminal.non_negative_int, "-1", "must be >= 0, got -1"),
        (terminal.positive_int, "ten", "expected an integer, got 'ten'"),
    ],
)
def test_integer_flag_types_refuse_out_of_range_with_the_value(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


# A count of zero or less is refused while the flags are parsed: exit status 2 and the flag
# named, before any model compiles or any run starts (benchmark step --repeats 0 once compiled
# the whole step and then divided by zero).
BAD_COUNTS = [
    ("benchmark", ["step", "--config", "configs/bench_ti.py", "--repeats", "0"], "--repeats"),
    ("benchmark", ["step", "--config", "configs/bench_ti.py", "--matmul-size", "-5"], "--matmul"),
    ("benchmark", ["loss", "--batch", "0", "--dim", "8"], "--batch"),
    ("benchmark", ["head", "--dim", "0"], "--dim"),
    ("zeroshot_eval", ["--workdir", "w", "--mc_samples", "-3"], "--mc_samples"),
    ("zeroshot_eval", ["--workdir", "w", "--batch_size", "0"], "--batch_size"),
    ("reproduce", ["contrastive", "--seeds", "0"], "--seeds"),
    ("reproduce", ["contrastive", "--width", "0"], "--width"),
    ("tools.chaos", ["--config", "configs/demo.py", "--trials", "0"], "--trials"),
    ("inspect_data", ["--config", "configs/demo.py", "--batches", "0"], "--batches"),
    ("tools.mutation_check", ["--jobs", "0"], "--jobs"),
    ("train_tokenizer", ["--input", "x", "--output", "y", "--vocab_size", "0"], "--vocab_size"),
    ("local_cluster", ["--processes", "0", "--devices_per_process", "1", "--", "true"], "--proc"),
]


@pytest.mark.parametrize(
    "script, argv, flag", BAD_COUNTS, ids=[f"{s} {a[0]} {f}" for s, a, f in BAD_COUNTS]
)
def test_scripts_refuse_a_bad_count_while_parsing(capsys, script, argv, flag):
    module = importlib.import_module(script if "." in script else f"scripts.{script}")
    with pytest.raises(SystemExit) as exit:
        module.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "must be >=" in err, err
