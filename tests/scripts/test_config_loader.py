"""Configs as code: get_config(arg), dotted overrides with type checks, and durations that
replace each other."""

import argparse
import textwrap

import pytest

from contrastive.trainer import resolve_total_steps, validate_config
from data.config_blocks import ConfigError
from scripts.config_loader import (
    add_config_flag,
    load_config,
    parse_args_with_overrides,
    split_overrides,
)
from tests import REPO

CONFIG = textwrap.dedent(
    """
    import ml_collections

    def get_config(arg=None):
        config = ml_collections.ConfigDict()
        config.arg = arg or ""
        config.total_steps = 10
        config.optim = dict(lr=1e-3, name="adamw", freeze=[])
        return config
    """
)


@pytest.fixture
def path(tmp_path):
    file = tmp_path / "config.py"
    file.write_text(CONFIG)
    return str(file)


def test_arg_and_overrides(path):
    config = load_config(path + ":loss=clip", ["total_steps=25", "optim.lr=3", "optim.name=sgd"])
    assert config.arg == "loss=clip"
    assert config.total_steps == 25
    assert config.optim.lr == 3.0 and isinstance(config.optim.lr, float)
    assert config.optim.name == "sgd"
    assert load_config(path, ["optim.freeze=['img/.*']"]).optim.freeze == ["img/.*"]


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("total_stepz=3", ConfigError, "total_stepz"),
        ("optim.lrr=3", ConfigError, "optim.lrr"),
        ("nope.lr=3", ConfigError, "nope"),
        ("total_steps=many", ConfigError, "total_steps"),
        ("optim.name=3", ConfigError, "optim.name"),
        ("total_steps", ConfigError, "key=value"),
    ],
)
def test_bad_overrides_name_the_culprit(path, override, error, match):
    with pytest.raises(error, match=match):
        load_config(path, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.py"):
        load_config(str(tmp_path / "nowhere.py"))


def test_split_overrides_takes_both_forms_and_keeps_the_other_arguments_in_order():
    argv = ["--config", "c.py:loss=clip", "--config.optim.lr=3e-4", "--workdir", "w"]
    argv += ["--config.total_steps", "7", "-v"]
    assert split_overrides(argv) == (
        ["optim.lr=3e-4", "total_steps=7"],
        ["--config", "c.py:loss=clip", "--workdir", "w", "-v"],
    )
    with pytest.raises(ValueError, match="--config.total_steps needs a value"):
        split_overrides(["--config", "c.py", "--config.total_steps"])


def test_a_dangling_override_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser()
    add_config_flag(parser)
    args, overrides = parse_args_with_overrides(parser, ["--config", "c.py", "--config.a.b=1"])
    assert (args.config, overrides) == ("c.py", ["a.b=1"])
    with pytest.raises(SystemExit):
        parse_args_with_overrides(parser, ["--config", "c.py", "--config.a.b"])
    assert "--config.a.b needs a value" in capsys.readouterr().err


DURATIONS = ("total_steps", "total_epochs", "total_examples")


@pytest.mark.parametrize("given", DURATIONS)
@pytest.mark.parametrize("override", DURATIONS)
def test_a_duration_override_replaces_the_configs_duration(path, given, override):
    config = load_config(path, [f"{given}=2"])
    assert [key for key in DURATIONS if key in config] == [given]
    config = load_config(path, [f"{given}=2", f"{override}=5"])
    assert [key for key in DURATIONS if key in config] == [override]
    assert config[override] == 5


def test_duration_overrides_keep_whole_steps_and_examples_and_allow_fractional_epochs(path):
    config = load_config(path, ["total_examples=1e4"])
    assert config.total_examples == 10_000 and isinstance(config.total_examples, int)
    assert load_config(path, ["total_epochs=0.5"]).total_epochs == 0.5
    assert load_config(path, ["total_epochs=3"]).total_epochs == 3


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("total_steps=2.5", ConfigError, "whole number"),
        ("total_steps=many", ConfigError, "must be a number"),
        ("total_epochs=True", ConfigError, "must be a number"),
        ("total_epochs=None", ConfigError, "must be a number"),
        ("total_examples=0", ConfigError, "positive"),
        ("total_epochs=-1.0", ConfigError, "positive"),
    ],
)
def test_bad_durations_name_the_culprit(path, override, error, match):
    with pytest.raises(error, match=match):
        load_config(path, [override])


def test_the_demo_config_in_epochs_takes_a_step_count():
    config = load_config(str(REPO / "configs" / "demo.py"), ["total_steps=3"])
    assert "total_epochs" not in config and config.total_steps == 3
    values = validate_config(config)
    assert resolve_total_steps(values) == 3  # no data needed once the length is in steps


def test_an_optional_top_level_setting_the_config_leaves_out_can_be_added(path):
    config = load_config(path, ["init_from=runs/first", "accum_steps=2"])
    assert config.init_from == "runs/first" and config.accum_steps == 2
    with pytest.raises(ConfigError, match="config has no init_form"):
        load_config(path, ["init_form=runs/first"])


def test_an_override_of_a_sampling_key_that_moved_names_its_new_place():
    demo = str(REPO / "configs" / "demo.py")
    with pytest.raises(ConfigError, match="model.noise.train_samples; it has moved to sampling"):
        load_config(demo, ["model.noise.train_samples=999"])
    with pytest.raises(ConfigError, match="loss.num_samples; it has moved to sampling.train_"):
        load_config(demo, ["loss.num_samples=4"])
    assert load_config(demo, ["sampling.train_samples=4"]).sampling.train_samples == 4
