"""Regex freezing: frozen parameters never move and carry no optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive import freezing
from models import text_transformer, vit


@pytest.fixture(scope="module")
def two_tower_params():
    """LiT-shaped tree: a tiny ViT under "img", a tiny text transformer under "txt", plus "t"."""
    image_tower = vit.Model(8, variant="mu/4", depth=1, pool_type="map", head_zeroinit=False)
    text_tower = text_transformer.Model(8, vocab_size=20, variant="mu", depth=1, max_len=6)
    img = jax.jit(image_tower.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    txt = jax.jit(text_tower.init)(jax.random.key(1), jnp.ones((1, 6), jnp.int32))["params"]
    return {"img": img, "txt": txt, "t": jnp.array(1.0)}


def names_and_sizes(params):
    """Independent path naming: walk the nested dicts by hand."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{prefix}/{key}" if prefix else key)
        else:
            out[prefix] = node.size

    walk(params, "")
    return out


def loss_fn(params):
    # Every parameter influences the loss, so every gradient is non-zero.
    return sum(jnp.sum(jnp.sin(leaf) * (i + 1)) for i, leaf in enumerate(jax.tree.leaves(params)))


def run_steps(optimizer, params, steps=4):
    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss_fn)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "rules",
    [["img/.*"], ["img/(embedding|Transformer)/.*", "txt/Embed_0/embedding", "t"]],
)
def test_frozen_leaves_are_bit_identical_and_stateless(two_tower_params, rules):
    params = two_tower_params
    report = freezing.report_frozen(params, rules)
    optimizer = freezing.freeze(optax.adamw(1e-2, weight_decay=0.1), rules)
    new_params, state = run_steps(optimizer, params)

    sizes = names_and_sizes(params)
    old_flat = dict(zip(freezing.parameter_names(params), jax.tree.leaves(params), strict=True))
    new_flat = dict(
        zip(freezing.parameter_names(new_params), jax.tree.leaves(new_params), strict=True)
    )
    assert set(old_flat) == set(sizes)
    for name in sizes:
        old, new = np.asarray(old_flat[name]), np.asarray(new_flat[name])
        if name in report.frozen:
            assert old.tobytes() == new.tobytes(), name  # bitwise, not approximately
        else:
            assert not np.array_equal(old, new), name

    # Adam keeps two moments per trainable value and none for frozen ones; the remaining state
    # is integer step counters.
    state_values = sum(
        leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
    )
    assert state_values == 2 * report.trainable_count
    assert report.frozen_count + report.trainable_count == sum(sizes.values())


def test_lit_rule_freezes_exactly_the_image_tower(two_tower_params):
    report = freezing.report_frozen(two_tower_params, ["img/.*"])
    sizes = names_and_sizes(two_tower_params)
    expected_frozen = sorted(n for n in sizes if n.startswith("img/"))
    assert sorted(report.frozen) == expected_frozen
    assert sorted(report.trainable) == sorted(n for n in sizes if not n.startswith("img/"))
    assert report.frozen_count == sum(sizes[n] for n in expected_frozen)
    assert "img/MAPHead_0/probe" in report.frozen and "txt/Embed_0/embedding" in report.trainable
    assert f"{report.frozen_count:,} values" in report.summary()


def test_rules_must_match_whole_names(two_tower_params):
    # "img" alone is a prefix, not a full path: it matches nothing.
    with pytest.raises(ValueError, match=r"match no parameter: \['img', 'txt/nothing.*'\]"):
        freezing.report_frozen(two_tower_params, ["img", "txt/nothing.*", "t"])
    optimizer = freezing.freeze(optax.sgd(0.1), ["image/.*"])
    with pytest.raises(ValueError, match="image/"):
        optimizer.init(two_tower_params)
    with pytest.raises(ValueError, match="not a valid regex"):
        freezing.report_frozen(two_tower_params, ["img/("])


def test_no_rules_leaves_the_optimizer_alone(two_tower_params):
    base = optax.sgd(0.1)
    assert freezing.freeze(base, []) is base
    report = freezing.report_frozen(two_tower_params, [])
    assert report.frozen == () and report.frozen_count == 0


def test_works_under_jit_with_shape_only_init(two_tower_params):
    params = two_tower_params
    optimizer = freezing.freeze(optax.adam(1e-2), ["txt/.*"])
    state = optimizer.init(params)

    @jax.jit
    def step(p, s):
        updates, s = optimizer.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, updates), s

    new_params, _ = step(params, state)
    jax.tree.map(np.testing.assert_array_equal, new_params["txt"], params["txt"])
    probe = new_params["img"]["MAPHead_0"]["probe"]
    assert not np.array_equal(probe, params["img"]["MAPHead_0"]["probe"])
    # The report accepts eval_shape structs, e.g. to print before anything is allocated.
    shapes = jax.eval_shape(lambda p: p, params)
    assert freezing.report_frozen(shapes, ["txt/.*"]) == freezing.report_frozen(params, ["txt/.*"])
