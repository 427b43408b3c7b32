"""tools.chaos: the comparison of a trial with the reference (a one-ulp parameter or a changed
loss is a difference, a wall-clock rate is not), where kills are placed, and the command end to
end (a reference, two trials killed in a checkpoint write and in an evaluation)."""

from __future__ import annotations

import json
import random

import ml_dtypes
import numpy as np
import pytest

from tests.data.helpers import make_fashion_dir
from tools import chaos
from tools.chaos_comparison import RunRecord, differences
from tools.chaos_trials import (
    CHECKPOINT_WRITE,
    EVALUATION,
    LATEST_FRACTION,
    RANDOM_TIME,
    Timeline,
    choose_kill,
)


def a_run() -> RunRecord:
    metrics = [
        {"step": 1, "loss": 2.5, "tau": 0.07, "examples_per_sec": 100.0},
        {"step": 2, "loss": 2.25, "tau": 0.07, "examples_per_sec": 110.0, "zeroshot_top1": 0.1},
    ]
    arrays = {
        ".params['kernel']": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        ".params['embedding']": np.arange(6).astype(ml_dtypes.bfloat16),
        ".step": np.asarray(2, np.int32),
    }
    return RunRecord(metrics, arrays)


def test_equal_runs_have_no_differences_whatever_their_throughput():
    trial = a_run()
    for row in trial.metrics:
        row["examples_per_sec"] *= 3  # wall-clock time is not part of the result
    assert differences(a_run(), trial) == []


def one_ulp_away(value: np.generic) -> np.generic:
    """The neighbouring representable value (away from zero): the smallest possible change."""
    bits = np.dtype(f"u{value.dtype.itemsize}")
    return (np.asarray(value).view(bits) + 1).view(value.dtype)[()]


def test_one_ulp_away_is_the_float32_neighbour():
    value = np.float32(0.3)
    assert one_ulp_away(value) == np.nextafter(value, np.float32(1))
    assert one_ulp_away(-value) == np.nextafter(-value, np.float32(-1))


@pytest.mark.parametrize("name", [".params['kernel']", ".params['embedding']"])
def test_a_one_ulp_difference_in_a_parameter_is_reported(name):
    trial = a_run()
    values = trial.arrays[name].copy()
    flat = values.reshape(-1)
    flat[5] = one_ulp_away(flat[5])
    trial.arrays[name] = values
    found = differences(a_run(), trial)
    assert len(found) == 1
    assert found[0].startswith(f"state{name}: 1 of {values.size} values differ in their bits")


def test_a_changed_loss_and_a_missing_array_are_reported():
    trial = a_run()
    trial.metrics[1]["loss"] = 2.2500000000000004  # one ulp of float64 away
    del trial.arrays[".step"]
    found = differences(a_run(), trial)
    assert found == [
        "metrics step 2 loss: 2.2500000000000004, the reference 2.25",
        "state.step: only in the reference",
    ]


def test_a_different_set_of_logged_steps_is_reported():
    trial = a_run()
    trial.metrics.append({"step": 2, "loss": 2.25, "tau": 0.07, "examples_per_sec": 1.0})
    assert differences(a_run(), trial) == [
        "metrics.jsonl logs steps [1, 2, 2], the reference [1, 2]"
    ]


def test_many_differences_are_cut_to_the_limit_with_a_count():
    trial = a_run()
    trial.metrics = [dict(row, loss=row["loss"] + 1, tau=0.5) for row in trial.metrics]
    found = differences(a_run(), trial, limit=3)
    assert len(found) == 3 and found[-1] == "... and 2 more"


TIMELINE = Timeline(
    seconds=100.0,
    logged={1: 40.0, 2: 41.0, 3: 42.0, 4: 50.0, 5: 51.0, 6: 52.0},
    checkpoint_writes={3: 0.5, 6: 1.0},
    evaluations={4: 8.0},
)


def test_kills_aim_at_phases_still_ahead_and_inside_their_duration():
    rng = random.Random(0)
    for _ in range(50):
        plan = choose_kill(CHECKPOINT_WRITE, TIMELINE, resume_step=3, rng=rng)
        assert plan.phase == CHECKPOINT_WRITE and plan.step == 6
        assert 0 <= plan.delay <= LATEST_FRACTION * 1.0
        plan = choose_kill(EVALUATION, TIMELINE, resume_step=0, rng=rng)
        assert plan.step == 4 and 0 <= plan.delay <= LATEST_FRACTION * 8.0
    # Nothing left to aim at: a random time instead.
    assert choose_kill(EVALUATION, TIMELINE, resume_step=4, rng=rng).phase == RANDOM_TIME


def test_a_random_time_is_placed_after_the_last_progress_line_before_it():
    rng = random.Random(0)
    placed_after_a_line = 0
    for _ in range(200):
        plan = choose_kill(RANDOM_TIME, TIMELINE, resume_step=2, rng=rng)
        if plan.step is None:  # measured from the start: before the line of step 3
            assert 0 <= plan.delay < 42.0
            continue
        placed_after_a_line += 1
        moment = TIMELINE.logged[plan.step] + plan.delay
        assert plan.step > 2 and moment <= 0.9 * TIMELINE.seconds
        # No progress line of a step after the resume point comes between the two.
        later = [t for s, t in TIMELINE.logged.items() if s > 2 and s != plan.step]
        assert not any(TIMELINE.logged[plan.step] < t <= moment for t in later)
    assert placed_after_a_line > 100  # 40 s of start-up in 90 s


TINY_DEMO = [
    f"--config.model.{tower}.{key}={value}"
    for tower in ("image_tower", "text_tower")
    for key, value in (("width", 32), ("depth", 1), ("mlp_dim", 64), ("num_heads", 2))
] + [
    "--config.model.image_tower.stem_channels=()",
    "--config.model.embed_dim=16",
    "--config.model.noise.num_factors=2",
    "--config.sampling.train_samples=2",
    "--config.sampling.chunk_size=2",
    "--config.evals.zeroshot.input.batch_size=8",
    "--config.input.shuffle_buffer=32",
    "--config.total_steps=6",
    "--config.log_every=1",
    "--config.checkpoint.every_steps=2",
    "--config.evals.zeroshot.every_steps=3",
]


@pytest.mark.slow
def test_two_trials_killed_in_a_checkpoint_write_and_an_evaluation_match_the_reference(
    tmp_path, capsys
):
    data = tmp_path / "fashion"
    make_fashion_dir(data, n_train=48, n_test=16)
    report_path = tmp_path / "chaos.json"
    argv = ["--trials", "2", "--seed", "1", "--workdir_root", str(tmp_path / "runs")]
    argv += ["--json", str(report_path), "--config", f"configs/demo.py:batch=16,data_dir={data}"]
    status = chaos.main(argv + TINY_DEMO)
    out = capsys.readouterr().out
    assert status == 0, out

    report = json.loads(report_path.read_text())
    assert report["reference"]["checkpoint_writes"].keys() == {"2", "4", "6"}
    assert report["reference"]["evaluations"].keys() == {"3", "6"}
    first_runs = [trial["runs"][0] for trial in report["trials"]]
    assert [run["kill"]["phase"] for run in first_runs] == [CHECKPOINT_WRITE, EVALUATION]
    for trial in report["trials"]:
        killed, finished = trial["runs"]
        assert killed["exit_code"] == -9 and killed["killed_at_seconds"] is not None
        assert finished["kill"] is None and finished["exit_code"] == 0
        assert trial["result"] == "identical" and trial["differences"] == []
    assert "2 of 2 trials identical to the reference bit for bit" in out
    rows = [line.split(" | ") for line in out.splitlines() if " | " in line]
    assert rows[0][0].strip() == "trial" and len(rows) == 3  # the header, one row per trial
    assert [(row[0].strip(), row[-1].strip()) for row in rows[1:]] == [
        ("1", "identical"),
        ("2", "identical"),
    ]
