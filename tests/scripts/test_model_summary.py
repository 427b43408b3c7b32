"""scripts.model_summary against independently instantiated towers and the HET-XL formula."""

import json
import math
import textwrap

import jax
import jax.numpy as jnp
import pytest

from models import text_transformer, vit
from scripts import model_summary

CONFIG = textwrap.dedent(
    """
    import ml_collections

    def get_config(arg=None):
        config = ml_collections.ConfigDict()
        config.model = dict(
            image_tower=dict(name="vit", variant="S/8", pool_type="map"),
            text_tower=dict(name="text_transformer", variant="Ti", vocab_size=1000, max_len=12),
            embed_dim=64,
            noise=dict(num_factors=5),
            image_size=32,
            text_length=12,
        )
        return config
    """
)


def params_of(module, *inputs):
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def test_counts_and_flops(tmp_path, capsys):
    path = tmp_path / "config.py"
    path.write_text(CONFIG)
    model_summary.main(["--config", str(path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    image = vit.Model(64, variant="S/8", pool_type="map")
    text = text_transformer.Model(64, vocab_size=1000, variant="Ti", max_len=12)
    assert summary["image_tower_params"] == params_of(image, jnp.zeros((1, 32, 32, 3)))
    assert summary["text_tower_params"] == params_of(text, jnp.zeros((1, 12), jnp.int32))
    dim, factors = 64, 5
    assert summary["hetxl_extra_params"] == 2 * dim**2 + (factors + 3) * dim
    assert summary["other_params"] == 1  # the learned temperature
    assert summary["total_params"] == (
        summary["image_tower_params"]
        + summary["text_tower_params"]
        + summary["hetxl_extra_params"]
        + 1
    )
    # Lower bound from the encoder matmuls alone: 2 FLOPs per weight per token.
    # ViT-S: 12 blocks of 4*384^2 (attention) + 2*384*1536 (MLP) weights, 16 tokens at 32 px / 8.
    block = 4 * 384**2 + 2 * 384 * 1536
    assert summary["image_flops_per_example"] >= 2 * 12 * block * 16
    assert summary["image_flops_per_example"] <= 2 * 2 * 12 * block * 16
    ti_block = 4 * 192**2 + 2 * 192 * 768
    assert 2 * 12 * ti_block * 12 <= summary["text_flops_per_example"] <= 4 * 12 * ti_block * 12
    assert summary["flops_per_example"] == pytest.approx(
        summary["image_flops_per_example"] + summary["text_flops_per_example"]
    )


def test_scanned_towers_report_the_flops_of_all_their_layers(tmp_path, capsys):
    flops = {}
    for scan in (False, True):
        path = tmp_path / f"config_{scan}.py"
        path.write_text(CONFIG.replace('pool_type="map")', f'pool_type="map", scan={scan})'))
        model_summary.main(["--config", str(path), "--json"])
        flops[scan] = json.loads(capsys.readouterr().out)["image_flops_per_example"]
    # XLA counts a loop body once; the summary must still count all 12 layers.
    assert flops[True] == pytest.approx(flops[False], rel=1e-3)


def test_overrides_reach_the_model(tmp_path, capsys):
    path = tmp_path / "config.py"
    path.write_text(CONFIG)
    model_summary.main(
        ["--config", str(path), "--config.model.embed_dim=32"]
        + ["--config.model.noise.num_factors", "3", "--json"]
    )
    summary = json.loads(capsys.readouterr().out)
    dim, factors = 32, 3
    assert summary["hetxl_extra_params"] == 2 * dim**2 + (factors + 3) * dim
