"""Every experiment config in configs/ loads and passes the trainer's validation."""

import pytest

from contrastive.trainer import validate_config
from scripts.config_loader import load_config
from tests import REPO

CONFIGS = sorted(
    path
    for path in (REPO / "configs").glob("*.py")
    if path.name not in ("__init__.py", "blocks.py", "data_fashion_mnist.py")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_validates(path):
    values = validate_config(load_config(str(path)))
    assert values["task"] in ("contrastive", "classification")


@pytest.mark.parametrize("arg", ["loss=clip", "loss=siglip", "loss=hetxl,epochs=1"])
def test_demo_arguments(arg):
    values = validate_config(load_config(f"configs/demo.py:{arg}"))
    assert values["loss"]["name"] == arg.split(",")[0].split("=")[1]
    assert (values["model"]["noise"] is not None) == (values["loss"]["name"] == "hetxl")


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match="lossy"):
        load_config("configs/demo.py:lossy=clip")
