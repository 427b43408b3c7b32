"""scripts.benchmark: the loss command (one JSON object per loss and HET-XL sample count), the
step command on a config in epochs with --loss and overrides (and its matmul-peak fraction), the
loop command, and the head command (rows, parameter counts, the memory fit check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from models.heteroscedastic import logit_distributions
from scripts import benchmark, benchmark_head
from tests import REPO
from tests.contrastive.test_trainer import contrastive_config, fashion_dir  # noqa: F401
from tests.scripts.test_entry_points import tiny_demo_overrides


def test_loss_benchmark_prints_one_row_per_loss_and_sample_count(capsys):
    benchmark.main(
        ["loss", "--batch", "16", "--dim", "8", "--samples", "1", "3", "--factors", "2"]
        + ["--sample-chunk", "2", "--column-chunk", "8", "--repeats", "1", "--json"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(row["loss"], row["samples"]) for row in rows] == [
        ("clip", None),
        ("siglip", None),
        ("hetxl", 1),
        ("hetxl", 3),
    ]
    for row in rows:
        assert (row["batch"], row["dim"]) == (16, 8)
        assert row["step_ms"] > 0 and row["peak_bytes"] > 0
        assert row["vs_clip"] == pytest.approx(row["step_ms"] / rows[0]["step_ms"], rel=1e-2)
        if row["loss"] != "hetxl":
            assert row["vs_floor"] is row["floor_ms"] is row["chunk"] is None
            continue
        assert row["chunk"] == min(2, row["samples"])
        assert row["vs_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"], rel=1e-2)
        # The floor scores S copies of each device's [B / devices, B] block: forward and the two
        # backward matmuls, the forward recomputed under jax.checkpoint, at least.
        local = 16 // row["devices"]
        assert row["floor_gflop"] * 1e9 >= 4 * 2 * row["samples"] * local * 16 * 8


def test_loss_benchmark_rejects_a_batch_the_devices_do_not_divide():
    with pytest.raises(SystemExit, match="multiple of the 8 devices"):
        benchmark.main(["loss", "--batch", "12", "--dim", "8", "--repeats", "1"])


def test_loop_benchmark_times_the_bare_step_the_trainer_loop_and_a_per_step_sync(
    fashion_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    config = contrastive_config(fashion_dir, "clip", steps=10)
    (tmp_path / "tiny.py").write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    benchmark.main(
        ["loop", "--config", str(tmp_path / "tiny.py"), "--steps", "4", "--log_every", "2"]
        + ["--rounds", "1"]
        + ["--json"]
    )
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["loss"], row["steps"], row["log_every"]) == ("clip", 4, 2)
    for key in ("bare_step_ms", "trainer_step_ms", "sync_every_step_ms"):
        assert row[key] > 0
    assert row["trainer_overhead"] == pytest.approx(
        row["trainer_step_ms"] / row["bare_step_ms"] - 1, abs=2e-3
    )


def test_step_and_loop_refuse_a_bad_loss_list_and_loop_refuses_several(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["step", "--config", "configs/bench_ti.py", "--loss", "clip,clip"])
    assert "distinct comma-separated losses" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="loop times one loss"):
        benchmark.main(["loop", "--config", "configs/bench_ti.py", "--loss", "clip,hetxl"])


def test_plot_draws_the_scaling_curves_of_head_and_loss_rows(tmp_path, capsys):
    head_json, loss_json = tmp_path / "head.json", tmp_path / "loss.json"
    benchmark.main(
        ["head", "--classes", "16,32", "--samples", "2", "--heads", "det,hetxl", "--dim", "8"]
        + ["--batch", "8", "--repeats", "1", "--json", str(head_json)]
    )
    benchmark.main(
        ["loss", "--batch", "16", "--dim", "8", "--samples", "2", "--factors", "2"]
        + ["--repeats", "1", "--json", str(loss_json)]
    )
    capsys.readouterr()
    out = tmp_path / "scaling.png"
    benchmark.main(["plot", "--head", str(head_json), "--loss", str(loss_json), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from scripts.benchmark_plot import head_series, loss_series

    head = head_series(json.loads(head_json.read_text()))
    assert set(head) == {"det", "hetxl S=2", "floor S=2"}
    assert [point[0] for point in head["hetxl S=2"]] == [16, 32]
    assert set(loss_series(json.loads(loss_json.read_text()))) == {
        "clip",
        "siglip",
        "hetxl S=2",
        "floor S=2",
    }
    with pytest.raises(SystemExit, match="not rows of `benchmark head`"):
        benchmark.main(["plot", "--head", str(loss_json), "--out", str(out)])


def test_loss_benchmark_refuses_config_overrides(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["loss", "--batch", "16", "--dim", "8", "--config.total_steps=3"])
    assert "'total_steps=3' applies to nothing" in capsys.readouterr().err


def test_step_benchmark_applies_loss_and_overrides_to_a_config_in_epochs(
    fashion_dir,  # noqa: F811
    capsys,
):
    # configs/demo.py gives its length in epochs (of the 64 examples written) and takes
    # arguments: --loss must still reach it, after them.
    spec = f"configs/demo.py:data_dir={fashion_dir},batch=16"
    argv = ["step", "--config", spec, "--loss", "clip,siglip", "--repeats", "1", "--json"]
    argv += ["--matmul-size", "64"]
    argv += tiny_demo_overrides(hetxl=False) + ["--config.input.batch_size=8"]
    benchmark.main(argv)
    row, siglip = json.loads(capsys.readouterr().out)
    # Both losses' steps, timed side by side, the ratio to the first one's.
    assert (siglip["config"], siglip["loss"]) == (f"{spec},loss=siglip", "siglip")
    assert row["vs_first"] == 1.0
    assert siglip["vs_first"] == pytest.approx(siglip["step_ms"] / row["step_ms"], rel=0.01)
    assert row["config"] == f"{spec},loss=clip"
    assert (row["loss"], row["batch"], row["devices"]) == ("clip", 8, 8)
    assert row["step_ms"] > 0 and row["peak_bytes"] > 0
    assert row["images_per_sec"] == pytest.approx(8 / row["step_ms"] * 1e3, rel=0.01)
    assert row["step_gflop"] > 0 and row["matmul_peak_gflops"] > 0
    assert row["matmul_dtype"] == "float32"  # the demo's towers multiply in f32
    assert row["step_gflops"] == pytest.approx(row["step_gflop"] / row["step_ms"] * 1e3, rel=2e-3)
    assert row["peak_fraction"] == pytest.approx(
        row["step_gflops"] / row["matmul_peak_gflops"], rel=2e-3
    )


def test_step_benchmark_refuses_a_loss_its_config_does_not_read(
    fashion_dir,  # noqa: F811
    tmp_path,
):
    config = contrastive_config(fashion_dir, "hetxl")
    (tmp_path / "fixed.py").write_text(
        "import ml_collections\n"
        f"def get_config(arg=None):\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    with pytest.raises(SystemExit, match="--loss clip: .* builds a hetxl loss"):
        benchmark.main(["step", "--config", str(tmp_path / "fixed.py"), "--loss", "clip"])


# Runs a module as a host without TensorFlow would: the import system's path finder does not see
# TensorFlow, TF Text or TFDS (importlib.util.find_spec answers None, imports raise). At exit it
# reports whether any of them got imported anyway.
WITHOUT_TENSORFLOW = """
import importlib.machinery, runpy, sys
HIDDEN = ("tensorflow", "tensorflow_text", "tensorflow_datasets")
class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [
    PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
]
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("imported:", sorted(name for name in sys.modules if name.partition(".")[0] in HIDDEN))
"""


def test_step_benchmark_runs_on_a_host_without_tensorflow():
    # An accelerator host may have JAX but no TensorFlow: checking a config and timing the step
    # on random batches read no data. configs/bench_b16.py's bf16 towers, shrunk to one block.
    spec = "configs/bench_b16.py:loss=hetxl,batch=8"
    argv = ["scripts.benchmark", "step", "--config", spec, "--repeats", "1", "--json"]
    argv += ["--matmul-size", "64", "--config.model.image_tower.variant=mu/32"]
    argv += ["--config.model.text_tower.variant=mu", "--config.sampling.train_samples=2"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows, imported = result.stdout.strip().splitlines()[-2:]
    assert imported == "imported: []"
    (row,) = json.loads(rows)
    assert (row["config"], row["loss"], row["batch"], row["devices"]) == (spec, "hetxl", 8, 1)
    # The probe runs in the towers' bf16, so peak_fraction compares like with like.
    assert row["matmul_dtype"] == "bfloat16"
    assert row["step_gflop"] > 0 and row["peak_fraction"] > 0


def test_a_step_with_fused_attention_counts_the_flops_of_einsum_attention():
    # cuDNN's fused attention is one custom call in the jaxpr: the FLOPs are counted on the same
    # step with flax's einsum attention, which has the same parameters.
    text = {"variant": "B", "attention_impl": "flax"}
    values = {"loss": {"name": "clip"}, "model": {"image_tower": {"variant": "B/16"}}}
    assert benchmark.with_einsum_attention(values) is None
    values["model"].update(
        image_tower={"variant": "B/16", "attention_impl": "cudnn"}, text_tower=text
    )
    einsum = benchmark.with_einsum_attention(values)
    assert einsum == {
        "loss": {"name": "clip"},
        "model": {"image_tower": {"variant": "B/16", "attention_impl": "flax"}, "text_tower": text},
    }
    assert values["model"]["image_tower"]["attention_impl"] == "cudnn"  # the timed step's own


def het_extra_params(dim: int, classes: int, factors: int) -> int:
    """HET (parameter-efficient) over DET: noise in the K-dim logit space, fixed tau. Two dense
    layers D -> K (diag scale d(x), factor scale v(x), kernel and bias each), the R x K loadings J
    and the K-dim shift c."""
    dense = dim * classes + classes
    return 2 * dense + factors * classes + classes


def hetxl_extra_params(dim: int, factors: int) -> int:
    """HET-XL over DET: the same noise layers in the D-dim pre-logit space, plus the learned
    (bounded) temperature's one scalar; nothing depends on K."""
    dense = dim * dim + dim
    return 2 * dense + factors * dim + dim + 1


def test_head_benchmark_rows_count_extra_parameters_from_the_heads_definitions(capsys):
    dim, factors = 8, 3
    benchmark.main(
        ["head", "--classes", "16,24", "--samples", "2", "--dim", str(dim), "--batch", "16"]
        + ["--repeats", "1", f"--config.model.noise.num_factors={factors}", "--json"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(row["head"], row["classes"], row["samples"]) for row in rows] == [
        ("det", 16, 1),
        ("het", 16, 2),
        ("hetxl", 16, 2),
        ("det", 24, 1),
        ("het", 24, 2),
        ("hetxl", 24, 2),
    ]
    expected_extra = {
        "det": lambda classes: 0,
        "het": lambda classes: het_extra_params(dim, classes, factors),
        "hetxl": lambda classes: hetxl_extra_params(dim, factors),
    }
    for row in rows:
        assert set(row) == {
            "head",
            "classes",
            "samples",
            "dim",
            "batch",
            "devices",
            "step_ms",
            "vs_det",
            "vs_floor",
            "vs_het",
            "form",
            "chunk",
            "step_gflop",
            "floor_ms",
            "floor_gflop",
            "timed_calls",
            "peak_bytes",
            "temp_bytes",
            "extra_params",
            "reason",
        }
        assert (row["dim"], row["batch"], row["reason"], row["timed_calls"]) == (dim, 16, None, 1)
        # Forward and two backward matmuls of the [B, D] x [D, K] logits at least, per device.
        local = 16 // row["devices"]
        assert row["step_gflop"] * 1e9 >= 6 * row["samples"] * local * dim * row["classes"]
        assert row["step_ms"] > 0 and row["peak_bytes"] >= row["temp_bytes"] > 0
        assert row["extra_params"] == expected_extra[row["head"]](row["classes"])
        det = next(r for r in rows if r["head"] == "det" and r["classes"] == row["classes"])
        assert row["vs_det"] == pytest.approx(row["step_ms"] / det["step_ms"], rel=1e-2)
    hetxl_extras = {row["extra_params"] for row in rows if row["head"] == "hetxl"}
    assert len(hetxl_extras) == 1
    for row in rows:
        if row["head"] != "hetxl":
            assert row["vs_floor"] is row["vs_het"] is row["floor_ms"] is row["form"] is None
            continue
        # The work floor: DET's logits on S x B rows, plus the noise layers (HETXL's own).
        assert row["floor_gflop"] * 1e9 >= 6 * 2 * local * dim * row["classes"]
        assert row["vs_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"], rel=1e-2)
        het = next(r for r in rows if r["head"] == "het" and r["classes"] == row["classes"])
        assert row["vs_het"] == pytest.approx(row["step_ms"] / het["step_ms"], rel=1e-2)
        assert (row["form"], row["chunk"]) == ("dense", 2)  # per-dim diag; 2 samples fit


def test_head_benchmark_times_each_forced_form_beside_the_cost_models_choice(capsys):
    benchmark.main(
        ["head", "--classes", "40", "--samples", "3", "--heads", "det,hetxl", "--dim", "8"]
        + ["--batch", "8", "--repeats", "1", "--forms", "auto,w_once", "--json"]
        + ["--config.model.noise.diag_mode=shared_scalar"]
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(row["head"], row["form"]) for row in rows] == [
        ("det", None),
        ("hetxl", "dense"),  # shared scalar, S = 3, D = 8: dense by the cost rule
        ("hetxl", "w_once"),
    ]
    assert all(row["vs_floor"] > 0 for row in rows[1:])


def test_head_benchmark_refuses_an_unknown_form():
    with pytest.raises(SystemExit):
        benchmark.main(["head", "--forms", "auto,sparse", "--classes", "16", "--dim", "8"])
    assert benchmark_head.PRELOGIT_FORMS == logit_distributions.PRELOGIT_FORMS


def test_head_benchmark_marks_a_combination_that_does_not_fit_and_writes_json_to_a_file(
    tmp_path, capsys
):
    out = tmp_path / "rows.json"
    benchmark.main(
        ["head", "--classes", "16", "--heads", "det", "--dim", "8", "--batch", "16"]
        + ["--memory-gib", "1e-9", "--json", str(out)]
    )
    (row,) = json.loads(out.read_text())
    assert row["step_ms"] is None and row["timed_calls"] == 0 and row["peak_bytes"] > 0
    assert "GiB per device" in row["reason"]
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["head", "classes"] and "reason" in table


def test_head_benchmark_refuses_an_unknown_head():
    with pytest.raises(SystemExit, match="unknown \\['xl'\\]"):
        benchmark.main(["head", "--heads", "det,xl", "--classes", "16", "--dim", "8"])
