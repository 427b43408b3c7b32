"""The sharded train step on 8 simulated devices: trains with each loss, is exact across mesh
layouts, and skips non-finite updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive.freezing import group_masks
from contrastive.losses import make_loss
from contrastive.mesh import make_mesh
from contrastive.objectives import contrastive_objective
from contrastive.step import init_train_state, make_train_step
from models.heteroscedastic import NoiseConfig, Sampling, TemperatureConfig
from models.two_towers import TwoTowers

BATCH, IMAGE, LENGTH, VOCAB = 16, 16, 8, 64


def tiny_model(loss_name):
    return TwoTowers(
        image_tower={"name": "vit", "variant": "mu/8", "pool_type": "gap"},
        text_tower={
            "name": "text_transformer",
            "variant": "mu",
            "vocab_size": VOCAB,
            "max_len": LENGTH,
            "pool_type": "mean",
        },
        embed_dim=16,
        image_noise=NoiseConfig(num_factors=2, diag_scale_init=0.05, kernel_init_scale=0.1)
        if loss_name == "hetxl"
        else None,
        temperature=TemperatureConfig("bounded_log", init=0.1, lo=0.01, hi=1.0),
        bias_init=-2.0 if loss_name == "siglip" else None,
    )


def random_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)), jnp.float32),
        "text": jnp.asarray(rng.integers(1, VOCAB, (BATCH, LENGTH)), jnp.int32),
    }


LOSS_OPTIONS = {
    "clip": {"column_chunk_size": 8},
    "siglip": {"column_chunk_size": 8},
    "hetxl": {"sampling": Sampling(train_samples=6, chunk_size=3), "column_chunk_size": 8},
}


def build(loss_name, mesh, optimizer=None):
    model = tiny_model(loss_name)
    optimizer = optimizer or optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
    batch = random_batch()

    def init_params(key):
        return model.init(key, batch["image"][:1], batch["text"][:1])["params"]

    # Every array big enough to split is split over "fsdp" (the tiny model has no large ones).
    state, shardings = init_train_state(
        init_params, optimizer, jax.random.key(0), mesh, min_fsdp_size=16
    )
    objective = contrastive_objective(model, make_loss(loss_name, **LOSS_OPTIONS[loss_name]), mesh)
    return state, make_train_step(objective, optimizer, mesh, shardings), batch


@pytest.mark.parametrize("loss_name", ["clip", "siglip", "hetxl"])
def test_each_loss_trains_the_two_tower_model(loss_name):
    mesh = make_mesh({"data": 8})
    state, step, batch = build(loss_name, mesh)
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 12
    for key in ("grad_norm", "tau", "positive_logit", "negative_logit"):
        assert np.isfinite(float(metrics[key])), key
    if loss_name == "hetxl":
        assert float(metrics["noise_diag_scale"]) > 0
        assert {"loss_image_to_text", "loss_text_to_image"} <= set(metrics)


def test_step_is_the_same_on_one_device_and_on_an_fsdp_mesh():
    # Plain SGD: its update is linear in the gradient, so float reduction-order differences stay
    # at rounding level (Adam would amplify them where gradients are ~0).
    results = []
    for mesh in (make_mesh({"data": 1}, jax.devices()[:1]), make_mesh({"data": 4, "fsdp": 2})):
        state, step, batch = build("hetxl", mesh, optax.sgd(0.5))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((jax.device_get(state.params), float(metrics["loss"])))
        if mesh.shape["fsdp"] > 1:
            specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
            assert sum("fsdp" in spec for spec in specs) > len(specs) // 2
    (params_one, loss_one), (params_fsdp, loss_fsdp) = results
    assert loss_one == pytest.approx(loss_fsdp, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_fsdp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_skips_the_update_and_is_counted():
    mesh = make_mesh({"data": 8})
    state, step, batch = build("clip", mesh)
    before = jax.device_get(state.params)
    poisoned = batch | {"image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    for expected_in_a_row in (1, 2):
        state, metrics = step(state, poisoned)
        assert int(metrics["nonfinite"]) == 1
        assert int(state.nonfinite_in_a_row) == expected_in_a_row
    for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, batch)
    assert int(metrics["nonfinite"]) == 0 and int(state.nonfinite_in_a_row) == 0
    assert int(state.step) == 3
    # The run's total keeps the two skipped updates after the streak ends.
    state, _ = step(state, poisoned)
    assert int(state.nonfinite_in_a_row) == 1 and int(state.nonfinite_updates) == 3


def test_mesh_sizes_are_validated():
    with pytest.raises(ValueError, match="multiply|split"):
        make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})


class FakeDevice:
    """What mesh_utils reads of a device, for a layout this machine does not have."""

    def __init__(self, index: int, slice_index: int):
        self.id, self.slice_index, self.process_index = index, slice_index, index // 2
        self.platform, self.device_kind = "cpu", "fake"

    def __repr__(self):
        return f"FakeDevice({self.id}, slice {self.slice_index})"


def test_a_multi_slice_mesh_keeps_fsdp_inside_a_slice_and_spans_slices_with_data():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]  # 2 slices of 4
    grid = make_mesh({"data": 4, "fsdp": 2}, devices=devices).devices
    assert grid.shape == (4, 2)
    for row in grid:  # each FSDP group within one slice
        assert len({device.slice_index for device in row}) == 1
    # The first half of the data axis is slice 0, the second slice 1.
    assert [row[0].slice_index for row in grid] == [0, 0, 1, 1]
    assert sorted(device.id for device in grid.flat) == list(range(8))
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        make_mesh({"data": 1, "fsdp": 8}, devices=devices)


def test_a_single_slice_mesh_uses_every_device_once():
    grid = make_mesh({"data": 4, "fsdp": 2}).devices
    assert sorted(device.id for device in grid.flat) == sorted(d.id for d in jax.devices())


def test_group_norms_are_the_norms_of_the_groups_gradients_and_updates():
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    model = tiny_model("hetxl")
    batch = random_batch()
    optimizer = optax.sgd(0.5)  # update = -0.5 * gradient: the update norm is known too

    def init_params(key):
        return model.init(key, batch["image"][:1], batch["text"][:1])["params"]

    state, shardings = init_train_state(init_params, optimizer, jax.random.key(0), mesh)
    objective = contrastive_objective(model, make_loss("hetxl", **LOSS_OPTIONS["hetxl"]), mesh)
    groups = {"noise": "image_noise_params/.*", "diag": ".*/diag_scale/(kernel|bias)"}
    masks = group_masks(state.params, groups)
    step = make_train_step(objective, optimizer, mesh, shardings, norm_groups=masks)
    rng = jax.random.fold_in(state.rng, state.step)
    grads = jax.grad(lambda p: objective(p, batch, rng)[0])(state.params)
    _, metrics = step(state, batch)
    noise_grads = grads["image_noise_params"]
    expected = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(noise_grads)))
    diag = noise_grads["diag_scale"]
    expected_diag = np.sqrt(np.sum(diag["kernel"] ** 2) + np.sum(diag["bias"] ** 2))
    assert float(metrics["grad_norm_noise"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["grad_norm_diag"]) == pytest.approx(expected_diag, rel=1e-5)
    assert float(metrics["update_norm_noise"]) == pytest.approx(0.5 * expected, rel=1e-5)
    assert 0 < expected_diag < expected < float(metrics["grad_norm"])
    with pytest.raises(
        ValueError, match=r"grad_norm_groups rules match no parameter: \['nois/.*'\]"
    ):
        group_masks(state.params, {"noise": "nois/.*"})
