"""Configs as code: get_config(arg) and dotted overrides with type checks."""

import textwrap

import pytest

from scripts.config_loader import load_config

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
        ("total_stepz=3", KeyError, "total_stepz"),
        ("optim.lrr=3", KeyError, "optim.lrr"),
        ("nope.lr=3", KeyError, "nope"),
        ("total_steps=many", TypeError, "total_steps"),
        ("optim.name=3", TypeError, "optim.name"),
        ("total_steps", ValueError, "key=value"),
    ],
)
def test_bad_overrides_name_the_culprit(path, override, error, match):
    with pytest.raises(error, match=match):
        load_config(path, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        load_config(str(tmp_path / "nowhere.py"))
