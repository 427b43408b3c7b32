"""benchmark step --reference-big-vision: the reference step is built from the config's towers,
timed beside ours and reported; configs and folders it cannot honour are refused by name.

big_vision itself is not installable here, so the plumbing runs against a small stand-in package
with big_vision's module layout and call signatures (written below into a temporary folder)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from scripts import benchmark
from tests.contrastive.test_trainer import fashion_dir  # noqa: F401
from tests.scripts.test_entry_points import tiny_demo_overrides
from tools import benchmark_reference

STAND_IN = {
    "big_vision/__init__.py": "",
    "big_vision/models/__init__.py": "",
    "big_vision/models/proj/__init__.py": "",
    "big_vision/models/proj/image_text/__init__.py": "",
    "big_vision/utils.py": """
        import jax
        import jax.numpy as jnp

        def bidirectional_contrastive_loss(zimg, ztxt, t, mask=None, reduction=False):
            logits = zimg @ ztxt.T * t
            loss = -0.5 * (jnp.diag(jax.nn.log_softmax(logits, 1))
                           + jnp.diag(jax.nn.log_softmax(logits, 0)))
            return (loss.mean() if reduction else loss), {"ncorrect": loss * 0}
    """,
    "big_vision/models/vit.py": """
        import flax.linen as nn

        class _Model(nn.Module):
            num_classes: int = None
            patch_size: tuple = (16, 16)
            width: int = 8
            depth: int = 1
            mlp_dim: int = None
            num_heads: int = 1
            pool_type: str = "gap"

            @nn.compact
            def __call__(self, image, *, train=False):
                x = nn.Dense(self.width)(image.reshape(image.shape[0], -1))
                return nn.Dense(self.num_classes, name="head")(x), {}

        def Model(num_classes=None, *, variant=None, **kw):
            return _Model(num_classes, **kw)
    """,
    "big_vision/models/proj/image_text/text_transformer.py": """
        import flax.linen as nn

        class _Model(nn.Module):
            num_classes: int
            width: int = 8
            depth: int = 1
            mlp_dim: int = None
            num_heads: int = 1
            vocab_size: int = 100
            pool_type: str = "last"

            @nn.compact
            def __call__(self, text, *, train=False):
                x = nn.Embed(self.vocab_size, self.width)(text)[:, -1]
                return nn.Dense(self.num_classes, name="head")(x), {}

        def Model(num_classes, *, variant=None, **kw):
            return _Model(num_classes, **kw)
    """,
    "big_vision/models/proj/image_text/two_towers.py": """
        import importlib
        import flax.linen as nn
        import jax.numpy as jnp

        class Model(nn.Module):
            image: dict = None
            text: dict = None
            out_dim: int = 128
            temperature_init: float = 1.0

            @nn.compact
            def __call__(self, image, text=None, **kw):
                out = {}
                towers = {"img": ("vit", image, self.image),
                          "txt": ("proj.image_text.text_transformer", text, self.text)}
                z = {}
                for name, (module, inputs, config) in towers.items():
                    tower = importlib.import_module(f"big_vision.models.{module}").Model(
                        self.out_dim, **(config or {}), name=name)
                    features, _ = tower(inputs, **kw)
                    out[f"{name}/norm"] = jnp.linalg.norm(features, axis=1, keepdims=True)
                    z[name] = features / (out[f"{name}/norm"] + 1e-8)
                t = self.param("t", lambda *_: jnp.log(self.temperature_init) * jnp.ones(1))
                out["t"], out["t/parameter"] = jnp.exp(t), t
                return z["img"], z["txt"], out
    """,
}


@pytest.fixture
def stand_in(tmp_path):
    """A folder holding a big_vision stand-in; its modules are forgotten afterwards, so every
    test imports its own."""
    for path, text in STAND_IN.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    yield tmp_path
    for name in [name for name in sys.modules if name.split(".")[0] == "big_vision"]:
        del sys.modules[name]


def demo_spec(data) -> str:
    return f"configs/demo.py:data_dir={data},batch=16"


def test_the_reference_step_is_timed_beside_ours_and_reported(
    stand_in,
    fashion_dir,  # noqa: F811
    capsys,
):
    argv = ["step", "--config", demo_spec(fashion_dir), "--loss", "clip", "--repeats", "2"]
    argv += ["--matmul-size", "64", "--reference-big-vision", str(stand_in), "--json"]
    benchmark.main(argv + tiny_demo_overrides(hetxl=False) + ["--config.input.batch_size=8"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["reference_step_ms"] > 0 and row["reference_peak_bytes"] > 0
    assert row["reference_step_gflop"] > 0
    assert row["step_vs_reference"] == pytest.approx(
        row["step_ms"] / row["reference_step_ms"], rel=2e-3
    )


def test_the_reference_towers_come_from_the_config(stand_in, fashion_dir):  # noqa: F811
    from contrastive.trainer import validate_config
    from scripts.config_loader import load_config

    # Plain patches (our default, no stem) are what big_vision's ViT computes.
    overrides = ["model.embed_dim=24", "model.image_tower.stem_channels=()"]
    values = validate_config(load_config(demo_spec(fashion_dir), overrides))
    model = benchmark_reference.reference_model(values, str(stand_in))
    image, text = values["model"]["image_tower"], values["model"]["text_tower"]
    assert model.out_dim == 24
    assert model.image == {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in image.items()
        if key not in ("name", "stem_channels")
    }
    assert model.text == {
        key: value for key, value in text.items() if key not in ("name", "max_len")
    }


def test_a_tower_setting_big_vision_lacks_is_refused_by_name(stand_in, fashion_dir):  # noqa: F811
    # configs/demo.py puts a convolution before the patches; big_vision's ViT has none.
    argv = ["step", "--config", demo_spec(fashion_dir), "--reference-big-vision", str(stand_in)]
    with pytest.raises(SystemExit, match=r"no 'stem_channels' .*stem_channels=\(\)"):
        benchmark.main(argv + ["--config.model.image_tower.stem_channels=(8,)"])


def test_a_folder_without_big_vision_is_refused(tmp_path, fashion_dir):  # noqa: F811
    argv = ["step", "--config", demo_spec(fashion_dir), "--reference-big-vision", str(tmp_path)]
    with pytest.raises(SystemExit, match="no big_vision/models/proj/image_text/two_towers.py"):
        benchmark.main(argv)


def test_a_class_token_position_row_is_refused_only_where_it_exists(stand_in):
    benchmark_reference.import_two_towers(str(stand_in))
    kwargs = benchmark_reference.reference_tower_kwargs
    # Without a class token the flag changes nothing: big_vision computes the same.
    assert kwargs({"name": "vit", "pool_type": "map", "posemb_cls": True}) == {"pool_type": "map"}
    # big_vision's own layout.
    assert kwargs({"name": "vit", "pool_type": "tok", "posemb_cls": False}) == {"pool_type": "tok"}
    with pytest.raises(SystemExit, match=r"no 'posemb_cls' .*posemb_cls=False"):
        kwargs({"name": "vit", "pool_type": "tok", "posemb_cls": True})
    with pytest.raises(SystemExit, match="a 'bert' tower has no big_vision counterpart"):
        kwargs({"name": "bert"})
