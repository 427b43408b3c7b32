"""The reference step beside ours: big_vision's two-tower model and contrastive update, built from
the same config, timed in the same run.

    python -m scripts.benchmark step --config configs/bench_ti.py --loss clip \
        --reference-big-vision ~/src/big_vision --json

DIR is a checkout of google-research/big_vision (the folder holding the `big_vision` package); it
is imported from there, never installed, and nothing of it is part of this project. The reference
step is the update function of big_vision's contrastive trainer
(big_vision/trainers/proj/image_text/contrastive.py): `two_towers.Model` applied with train=True
and a dropout key, `utils.bidirectional_contrastive_loss` with reduction, value_and_grad, the
optimizer update, and the L2 norms of gradients, parameters and updates it reports. Two things are
ours so that only the implementation differs: the optimizer is built from the config's `optim`
block by the same `make_optimizer` the trainer uses (clipping, AdamW, weight-decay rules,
schedule), and the loss sees the global batch (big_vision's `loss_use_global_batch=True`, its CLIP
and LiT setting), jit-compiled over the same mesh and fed the same device batch as our step.

The reference towers come from the config's `model.image_tower` / `model.text_tower`: a `vit` and
a `text_transformer` whose keys big_vision's models also have (variant, widths, pooling, ...).
A key big_vision has no counterpart for (our conv stem, a class token's own position row) is
refused by name, as is any other tower, because the two steps would then not compute the same
model.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class TowerMatch:
    """How one of our tower names maps onto big_vision.

    module: its big_vision module, under big_vision.models.
    field: where the tower sits under config.model (for the refusal's override hint).
    own_only: keys of our tower config that say how to build it here, not what it computes.
    """

    module: str
    field: str
    own_only: frozenset[str]


TOWERS = {
    "vit": TowerMatch("vit", "image_tower", frozenset({"name"})),
    "text_transformer": TowerMatch(
        "proj.image_text.text_transformer", "text_tower", frozenset({"name", "max_len"})
    ),
}
# Keys big_vision's towers lack, at the value that computes what big_vision computes.
BIG_VISION_VALUES = {"stem_channels": (), "posemb_cls": False}


def _computes_as_big_vision(key: str, value: Any, tower: Mapping[str, Any]) -> bool:
    """Whether a tower key big_vision lacks is set to what big_vision computes anyway: no conv
    stem, or a class-token position row that does not exist (posemb_cls=False is big_vision's
    layout; True matters only for a learned table with "tok" pooling)."""
    if key == "stem_channels":
        return tuple(value) == BIG_VISION_VALUES[key]
    if key == "posemb_cls":
        class_row = (
            tower.get("pool_type", "gap") == "tok" and tower.get("posemb", "learn") == "learn"
        )
        return not (value and class_row)
    return False


# big_vision's contrastive configs start the temperature at 10 (t = log 10 under exp); the step
# time does not depend on it.
TEMPERATURE_INIT = 10.0


def reference_tower_kwargs(tower: Mapping[str, Any]) -> dict:
    """big_vision keyword arguments for one of our tower configs (big_vision already imported);
    raises SystemExit naming a tower or key big_vision's model does not have."""
    name = tower.get("name")
    if name not in TOWERS:
        raise SystemExit(
            f"error: --reference-big-vision: a {name!r} tower has no big_vision counterpart here; "
            f"benchmark a config whose towers are {sorted(TOWERS)}"
        )
    match = TOWERS[name]
    module = importlib.import_module(f"big_vision.models.{match.module}")
    fields = set(inspect.signature(module._Model).parameters) | {"variant"}
    kwargs = {}
    for key, value in tower.items():
        if key in match.own_only:
            continue
        if key not in fields:
            if _computes_as_big_vision(key, value, tower):
                continue
            hint = (
                f", e.g. --config.model.{match.field}.{key}={BIG_VISION_VALUES[key]!r}"
                if key in BIG_VISION_VALUES
                else ""
            )
            raise SystemExit(
                f"error: --reference-big-vision: big_vision's {name} has no {key!r} "
                f"(this config sets {key}={value!r}); benchmark a config without it{hint}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


def import_two_towers(directory: str):
    """big_vision's two_towers module, imported from the checkout at `directory`."""
    root = Path(directory).expanduser().resolve()
    if not (root / "big_vision" / "models" / "proj" / "image_text" / "two_towers.py").is_file():
        raise SystemExit(
            f"error: --reference-big-vision {directory}: no big_vision/models/proj/image_text/"
            "two_towers.py there; give the folder that holds the big_vision package (a clone of "
            "github.com/google-research/big_vision)"
        )
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("big_vision.models.proj.image_text.two_towers")
    except ImportError as error:
        raise SystemExit(
            f"error: --reference-big-vision {directory}: importing big_vision failed: {error}"
        ) from error
    finally:
        sys.path.remove(str(root))
    found = Path(module.__file__).resolve()
    if root not in found.parents:
        raise SystemExit(
            f"error: --reference-big-vision {directory}: `big_vision` was already imported from "
            f"{found.parent}; run without that package on the path"
        )
    return module


def reference_model(values: Mapping[str, Any], directory: str):
    """big_vision's two_towers.Model for the config's towers and embedding dimension."""
    two_towers = import_two_towers(directory)
    model_values = values["model"]
    return two_towers.Model(
        image=reference_tower_kwargs(model_values["image_tower"]),
        text=reference_tower_kwargs(model_values["text_tower"]),
        out_dim=model_values["embed_dim"],
        temperature_init=TEMPERATURE_INIT,
    )


def compiled_reference_step(model, values: Mapping[str, Any], mesh, batch, num_steps: int):
    """(compiled update, its state (params, opt, rng), its FLOPs per device) of big_vision's
    contrastive trainer for `model` (from reference_model) and the config's optimizer over
    num_steps, on `batch` ({"image", "text"} on `mesh`); call as
    *state, loss, measurements = step(*state, batch)."""
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    from contrastive.flop_count import jaxpr_matmul_flops
    from contrastive.mesh import replicated
    from contrastive.optim import make_optimizer

    utils = importlib.import_module("big_vision.utils")
    images, texts = batch["image"], batch["text"]
    init_rng, loop_rng = jax.random.split(jax.random.PRNGKey(values.get("seed", 0)))

    def init(rng):
        return flax.core.unfreeze(model.init(rng, images[:1], texts[:1]))["params"]

    params = jax.jit(init)(init_rng)
    optimizer, _ = make_optimizer(dict(values["optim"]), num_steps, params)
    state = jax.device_put((params, optimizer.init(params), loop_rng), replicated(mesh))

    def update(params, opt, rng, batch):
        rng, rng_model = jax.random.split(rng)

        def loss_fn(params, images, labels):
            zimg, ztxt, extras = model.apply(
                {"params": params}, images, labels, train=True, rngs={"dropout": rng_model}
            )
            loss, loss_extras = utils.bidirectional_contrastive_loss(
                zimg, ztxt, extras["t"], reduction=True
            )
            return loss, {
                "t": extras["t"],
                "t/parameter": extras["t/parameter"],
                "nimg": jnp.mean(extras["img/norm"]),
                "ntxt": jnp.mean(extras["txt/norm"]),
                **loss_extras,
            }

        (loss, measurements), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch["image"], batch["text"]
        )
        updates, opt = optimizer.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        for name, tree in (("grads", grads), ("params", params), ("updates", updates)):
            leaves = jax.tree.leaves(tree)
            measurements[f"l2_{name}"] = jnp.sqrt(sum(jnp.vdot(x, x) for x in leaves))
        return params, opt, rng, loss, measurements

    traced = jax.jit(update, donate_argnums=(0, 1)).trace(*state, batch)
    # Per device, as scripts/benchmark.py counts our step.
    per_device_flops = jaxpr_matmul_flops(traced.jaxpr) / mesh.size
    return traced.lower().compile(), state, per_device_flops
