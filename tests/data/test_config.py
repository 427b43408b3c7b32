"""Validation of the config.input block: every problem is reported, by name, before data is read."""

from __future__ import annotations

import ml_collections
import pytest

from data.config import InputConfig, validate_input_config
from data.config_blocks import ConfigError


def block(**overrides):
    values = {
        "source": {"name": "tfrecord", "files": "/data/pairs-*.tfrecord"},
        "pp": "decode|resize(32)|value_range(-1, 1)|tokenize(max_len=16)",
        "batch_size": 64,
    }
    values.update(overrides)
    return values


def problems(values) -> str:
    with pytest.raises(ConfigError) as error:
        validate_input_config(values)
    return str(error.value)


def test_valid_block_gets_defaults():
    cfg = validate_input_config(block())
    assert isinstance(cfg, InputConfig)
    assert (cfg.shuffle_buffer, cfg.seed, cfg.prefetch, cfg.num_epochs) == (10_000, 0, 2, None)
    assert cfg.source_name == "tfrecord"
    assert cfg.source_options == {"files": "/data/pairs-*.tfrecord"}


def test_config_dict_with_references_is_accepted():
    config = ml_collections.ConfigDict({"seed": 7})
    config.input = ml_collections.ConfigDict({**block(), "seed": config.get_ref("seed")})
    config.seed = 9
    assert validate_input_config(config.input).seed == 9


def test_unknown_and_missing_keys_are_named():
    text = problems(
        {"source": {"name": "tfrecord", "files": "x"}, "pp": "", "batchsize": 8, "shuffle": 10}
    )
    assert "input: unknown key(s) ['batchsize', 'shuffle']" in text
    assert "input.batch_size: missing (required)" in text
    assert (
        "; known: ['batch_size', 'max_text_bytes', 'num_epochs', 'pp', 'prefetch', 'seed', "
        "'shuffle_buffer', 'source']" in text
    )


def test_wrong_types_and_ranges_are_named_all_at_once():
    text = problems(
        block(batch_size="64", seed=1.5, shuffle_buffer=-1, num_epochs=0, prefetch=True)
    )
    for fragment in (
        "input.batch_size='64': expected an integer >= 1",
        "input.seed=1.5: expected an integer >= 0",
        "input.shuffle_buffer=-1: expected an integer >= 0",
        "input.num_epochs=0: expected an integer >= 1",
        "input.prefetch=True: expected an integer >= 0",
    ):
        assert fragment in text


def test_source_problems():
    assert "unknown source name 'webdataset'" in problems(block(source={"name": "webdataset"}))
    assert "['fashion_mnist', 'image_folder', 'tfds', 'tfrecord']" in problems(
        block(source={"name": "webdataset"})
    )
    assert "needs a 'name'" in problems(block(source={"files": "x"}))
    text = problems(block(source={"name": "tfrecord", "files": "x", "shards": 4}))
    assert "unexpected keyword argument 'shards'" in text and "cycle_length" in text
    text = problems(block(source={"name": "fashion_mnist", "split": 1}))
    assert "split=1 should be str" in text
    assert "missing a required argument: 'dataset'" in problems(block(source={"name": "tfds"}))


def test_op_string_errors_surface_in_validation():
    text = problems(block(pp="decode|resise(32)"))
    assert "input.pp='decode|resise(32)': " in text
    assert "unknown op 'resise'" in text and "known ops" in text
