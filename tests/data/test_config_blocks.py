"""build_block: a frozen dataclass read from a config mapping, every problem reported at once."""

import dataclasses

import pytest

from data.config_blocks import (
    boolean,
    build_block,
    defaults,
    int_at_least,
    one_of,
    optional,
    real,
    setting,
    string,
)


@dataclasses.dataclass(frozen=True)
class Block:
    size: int = setting(check=int_at_least(1))
    rate: float = setting(0.5, real(0.0, 1.0))
    mode: str = setting("fast", one_of(("fast", "slow")))
    verbose: bool = setting(False, boolean)
    label: str | None = setting(None, optional(string))

    def problems(self) -> list[str]:
        if self.mode == "slow" and self.rate > 0.25:
            return [f"rate: at most 0.25 with mode='slow', got {self.rate}"]
        return []


def test_defaults_are_filled_in():
    block, problems = build_block(Block, {"size": 4}, "block")
    assert problems == []
    assert block == Block(size=4, rate=0.5, mode="fast", verbose=False, label=None)
    assert defaults(Block) == {"rate": 0.5, "mode": "fast", "verbose": False, "label": None}


@dataclasses.dataclass(frozen=True)
class Sized:
    size: int = setting(3, int_at_least(1))


def test_none_means_all_defaults():
    assert build_block(Sized, None, "sized") == (Sized(size=3), [])


def test_unknown_keys_are_listed_with_the_known_ones():
    assert build_block(Block, {"size": 1, "sise": 2, "colour": 3}, "block") == (
        None,
        [
            "block: unknown key(s) ['colour', 'sise']; "
            "known: ['label', 'mode', 'rate', 'size', 'verbose']"
        ],
    )


def test_a_missing_required_key():
    assert build_block(Block, {}, "block") == (None, ["block.size: missing (required)"])


def test_each_value_is_checked_by_its_field():
    assert build_block(Block, {"size": 1, "rate": 2.0}, "block") == (
        None,
        ["block.rate=2.0: expected a number in [0.0, 1.0]"],
    )
    assert build_block(Block, {"size": 1, "label": 7}, "outer.block") == (
        None,
        ["outer.block.label=7: expected a string"],
    )


def test_a_bool_is_not_an_int():
    assert build_block(Block, {"size": True}, "block") == (
        None,
        ["block.size=True: expected an integer >= 1"],
    )
    assert build_block(Block, {"size": 1, "verbose": 1}, "block") == (
        None,
        ["block.verbose=1: expected True or False"],
    )


def test_the_cross_field_check_runs_once_every_value_passes():
    assert build_block(Block, {"size": 1, "mode": "slow"}, "block") == (
        None,
        ["block.rate: at most 0.25 with mode='slow', got 0.5"],
    )
    block, problems = build_block(Block, {"size": 1, "mode": "slow", "rate": 0.25}, "block")
    assert problems == [] and block.mode == "slow"


def test_every_problem_is_reported_at_once():
    values = {"size": 0, "rate": "high", "mode": "medium", "verbose": "yes", "extra": 1}
    block, problems = build_block(Block, values, "block")
    assert block is None
    assert problems == [
        "block: unknown key(s) ['extra']; known: ['label', 'mode', 'rate', 'size', 'verbose']",
        "block.size=0: expected an integer >= 1",
        "block.rate='high': expected a finite number in [0.0, 1.0]",
        "block.mode='medium': expected one of ['fast', 'slow']",
        "block.verbose='yes': expected True or False",
    ]
    assert len(problems) == 5


@pytest.mark.parametrize("value, kind", [("fast", "str"), ([1], "list"), (3, "int")])
def test_a_block_that_is_not_a_mapping(value, kind):
    assert build_block(Block, value, "block") == (None, [f"block: expected a mapping, got {kind}"])


def test_a_config_dict_is_read_as_its_mapping():
    ml_collections = pytest.importorskip("ml_collections")
    block, problems = build_block(Block, ml_collections.ConfigDict({"size": 2}), "block")
    assert problems == [] and block.size == 2


def test_the_trainer_blocks():
    from contrastive.config_schema import CheckpointConfig, validate_structure
    from contrastive.evaluators.schema import RetrievalEval, eval_block
    from contrastive.mesh import MeshConfig
    from models.heteroscedastic import Sampling

    assert build_block(CheckpointConfig, {"keep": 0}, "checkpoint") == (
        None,
        ["checkpoint.keep=0: expected an integer >= 1"],
    )
    assert build_block(CheckpointConfig, None, "checkpoint")[0] == CheckpointConfig(
        every_steps=1000, keep=3, async_save=True, directory=None
    )
    assert build_block(MeshConfig, {"data": -1, "fsdp": -1}, "mesh") == (
        None,
        ["mesh.fsdp: only one of data, fsdp may be -1"],
    )
    assert build_block(MeshConfig, {"data": 0}, "mesh") == (
        None,
        ["mesh.data=0: expected an integer >= 1, or -1"],
    )
    assert build_block(Sampling, {"chunk_size": 4}, "sampling") == (
        Sampling(train_samples=16, eval_samples=16, chunk_size=4, share_across_batch=False),
        [],
    )
    with pytest.raises(ValueError, match="train_samples=0: expected an integer >= 1"):
        Sampling(train_samples=0)
    block = {"kind": "retrieval", "every_steps": 5, "input": {}}
    assert eval_block("r", block) == (RetrievalEval("retrieval", 5, {}, max_pairs=50_000), [])
    assert eval_block("r", {**block, "max_pairs": 0, "mc_samples": 4}) == (
        None,
        [
            "evals.r.mc_samples has moved: set evals.r.monte_carlo=True and the number of "
            "samples in sampling.eval_samples",
            "evals.r.max_pairs=0: expected an integer >= 1",
        ],
    )
    problems = validate_structure(
        {
            "task": "contrastive",
            "input": {},
            "model": {},
            "optim": {},
            "total_steps": 10,
            "checkpoint": {"every_steps": 0, "keep": 0},
            "mesh": {"model": 2},
        }
    )
    assert problems == [
        "checkpoint.every_steps=0: expected an integer >= 1",
        "checkpoint.keep=0: expected an integer >= 1",
        "mesh: unknown key(s) ['model']; known: ['data', 'fsdp']",
    ]
