"""Sharded contrastive losses on 8 simulated devices against plain single-device dense versions.

The references below form the whole B x B logit matrix on one device and use jax's autodiff; the
losses under test split the batch over the mesh, gather with gradients, chunk over columns and
(HET-XL) over samples with a hand-written backward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contrastive.losses import make_loss, shard_loss
from contrastive.xla_stats import compile_function, peak_bytes
from models.heteroscedastic import NoiseParameters, Sampling, standard_normal_draws

DEVICES = 8


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= DEVICES
    return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def random_outputs(batch, dim=6, factors=2, seed=0, noise_scale=0.3):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "image_embedding": unit(normal(batch, dim)),
        "text_embedding": unit(normal(batch, dim)),
        "tau": jnp.float32(0.2),
        "bias": jnp.float32(-1.5),
        "noise": NoiseParameters(
            factors=noise_scale * normal(batch, dim, factors),
            diag_scale=noise_scale * jnp.abs(normal(batch, dim)) + 1e-3,
            mean_shift=0.05 * normal(batch, dim),
        ),
    }


# ------------------------------------------------------------------------------------------
# Dense references.


def dense_clip(outputs, rng):
    del rng
    logits = outputs["image_embedding"] @ outputs["text_embedding"].T / outputs["tau"]
    diagonal = jnp.arange(logits.shape[0])
    i2t = jax.nn.log_softmax(logits, axis=1)[diagonal, diagonal]
    t2i = jax.nn.log_softmax(logits, axis=0)[diagonal, diagonal]
    return -(i2t.mean() + t2i.mean()) / 2


def dense_siglip(outputs, rng):
    del rng
    logits = outputs["image_embedding"] @ outputs["text_embedding"].T / outputs["tau"]
    signs = 2 * jnp.eye(logits.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * (logits + outputs["bias"]))) / logits.shape[0]


def dense_noisy(embeddings, noise, key, num_samples, renormalize, share):
    """[S, B, D] noisy copies of [B, D] embeddings, noise drawn as the library documents."""
    batch, dim, factors = noise.factors.shape
    e_r, e_n = standard_normal_draws(key, jnp.arange(num_samples), batch, factors, dim, share)
    e_r = jnp.broadcast_to(e_r, (num_samples, batch, factors))
    e_n = jnp.broadcast_to(e_n, (num_samples, batch, dim))
    eps = jnp.einsum("bdr,sbr->sbd", noise.factors, e_r) + noise.diag_scale * e_n
    noisy = embeddings + eps + noise.mean_shift
    return unit(noisy) if renormalize else noisy


def dense_hetxl(num_samples, renormalize=False, share=False):
    directions = dense_hetxl_directions(num_samples, renormalize, share)

    def loss(outputs, rng):
        image_to_text, text_to_image = directions(outputs, rng)
        return (image_to_text + text_to_image) / 2

    return loss


def dense_hetxl_directions(num_samples, renormalize=False, share=False):
    """(image -> text loss, text -> image loss): minus the MC log-likelihoods, batch means."""

    def losses(outputs, rng):
        images, texts = outputs["image_embedding"], outputs["text_embedding"]
        noisy = dense_noisy(images, outputs["noise"], rng, num_samples, renormalize, share)
        logits = jnp.einsum("sbd,kd->sbk", noisy, texts) / outputs["tau"]  # [S, images, texts]
        diagonal = jnp.arange(images.shape[0])
        i2t = jax.nn.log_softmax(logits, axis=2)[:, diagonal, diagonal]
        if outputs.get("text_noise") is None:
            t2i = jax.nn.log_softmax(logits, axis=1)[:, diagonal, diagonal]
        else:
            text_key = jax.random.fold_in(rng, 1)
            noisy_texts = dense_noisy(
                texts, outputs["text_noise"], text_key, num_samples, renormalize, share
            )
            text_logits = jnp.einsum("sbd,kd->sbk", noisy_texts, images) / outputs["tau"]
            t2i = jax.nn.log_softmax(text_logits, axis=2)[:, diagonal, diagonal]
        average = lambda lp: jax.nn.logsumexp(lp, axis=0) - jnp.log(num_samples)  # noqa: E731
        return -average(i2t).mean(), -average(t2i).mean()

    return losses


def assert_trees_close(got, expected, rtol=1e-5, atol=1e-7):
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        other = dict(jax.tree_util.tree_leaves_with_path(got))[path]
        np.testing.assert_allclose(other, leaf, rtol=rtol, atol=atol, err_msg=str(path))


def compare(mesh, loss, reference, outputs, seed=3):
    rng = jax.random.key(seed)
    sharded = shard_loss(loss, mesh, "data")
    value, grads = jax.jit(jax.value_and_grad(lambda o: sharded(o, rng)[0]))(outputs)
    ref_value, ref_grads = jax.value_and_grad(lambda o: reference(o, rng))(outputs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    # Gradients are compared leaf by leaf, relative to the largest entry of each leaf.
    for path, ref_leaf in jax.tree_util.tree_leaves_with_path(ref_grads):
        got_leaf = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
        scale = float(jnp.max(jnp.abs(ref_leaf)))
        np.testing.assert_allclose(
            got_leaf, ref_leaf, rtol=1e-5, atol=1e-5 * scale, err_msg=str(path)
        )
    return value


@pytest.mark.parametrize("batch,chunk", [(24, 5), (40, 40), (8, 3)])
def test_clip_matches_dense_reference(mesh, batch, chunk):
    compare(mesh, make_loss("clip", column_chunk_size=chunk), dense_clip, random_outputs(batch))


@pytest.mark.parametrize("batch,chunk", [(24, 5), (16, 64)])
def test_siglip_matches_dense_reference(mesh, batch, chunk):
    compare(mesh, make_loss("siglip", column_chunk_size=chunk), dense_siglip, random_outputs(batch))


@pytest.mark.parametrize(
    "batch,samples,sample_chunk,column_chunk", [(24, 7, 3, 5), (16, 5, 5, 64), (8, 1, 4, 3)]
)
def test_hetxl_matches_dense_reference(mesh, batch, samples, sample_chunk, column_chunk):
    loss = make_loss(
        "hetxl",
        sampling=Sampling(train_samples=samples, chunk_size=sample_chunk),
        column_chunk_size=column_chunk,
    )
    compare(mesh, loss, dense_hetxl(samples), random_outputs(batch))


@pytest.mark.parametrize("renormalize,share", [(True, False), (False, True)])
def test_hetxl_options_match_dense_reference(mesh, renormalize, share):
    loss = make_loss(
        "hetxl",
        sampling=Sampling(train_samples=6, chunk_size=4, share_across_batch=share),
        column_chunk_size=7,
        renormalize=renormalize,
    )
    compare(mesh, loss, dense_hetxl(6, renormalize, share), random_outputs(16))


def test_hetxl_with_text_noise_matches_dense_reference(mesh):
    outputs = random_outputs(16)
    outputs["text_noise"] = random_outputs(16, seed=9)["noise"]
    loss = make_loss("hetxl", sampling=Sampling(train_samples=5, chunk_size=2), column_chunk_size=6)
    compare(mesh, loss, dense_hetxl(5), outputs)


def test_hetxl_with_noise_at_the_floor_equals_clip(mesh):
    outputs = random_outputs(24)
    clip_value = jax.jit(shard_loss(make_loss("clip"), mesh))(outputs, jax.random.key(0))[0]
    silent = outputs | {"noise": jax.tree.map(jnp.zeros_like, outputs["noise"])}
    hetxl = jax.jit(shard_loss(make_loss("hetxl", sampling=Sampling(train_samples=8)), mesh))
    np.testing.assert_allclose(hetxl(silent, jax.random.key(1))[0], clip_value, rtol=1e-6)
    floor = silent | {"noise": silent["noise"].replace(diag_scale=jnp.full((24, 6), 1e-3))}
    np.testing.assert_allclose(hetxl(floor, jax.random.key(1))[0], clip_value, rtol=1e-3)
    noisy = hetxl(outputs, jax.random.key(1))[0]
    assert abs(float(noisy) - float(clip_value)) > 1e-3


def test_metrics_are_exact_global_statistics(mesh):
    outputs = random_outputs(16)
    _, metrics = jax.jit(shard_loss(make_loss("siglip"), mesh))(outputs, jax.random.key(0))
    logits = outputs["image_embedding"] @ outputs["text_embedding"].T / 0.2 - 1.5
    positive = np.diag(logits)
    negative = logits[~np.eye(16, dtype=bool)]
    np.testing.assert_allclose(metrics["positive_logit"], positive.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["negative_logit"], negative.mean(), rtol=1e-5)
    assert float(metrics["bias"]) == -1.5


def test_per_direction_losses_and_noise_metrics_match_dense_values(mesh):
    outputs = random_outputs(16)
    rng = jax.random.key(2)
    diagonal = np.arange(16)
    logits = outputs["image_embedding"] @ outputs["text_embedding"].T / outputs["tau"]
    clip_i2t = -jax.nn.log_softmax(logits, axis=1)[diagonal, diagonal].mean()
    clip_t2i = -jax.nn.log_softmax(logits, axis=0)[diagonal, diagonal].mean()
    hetxl_i2t, hetxl_t2i = dense_hetxl_directions(5)(outputs, rng)
    # The two directions differ, so a metric reporting the other direction shows.
    assert abs(float(clip_i2t - clip_t2i)) > 1e-2 and abs(float(hetxl_i2t - hetxl_t2i)) > 1e-2
    expected = {
        "clip": {"loss_image_to_text": clip_i2t, "loss_text_to_image": clip_t2i},
        "hetxl": {"loss_image_to_text": hetxl_i2t, "loss_text_to_image": hetxl_t2i},
    }
    noise = outputs["noise"]
    # Mean diagonal scale over examples and dimensions; mean Frobenius norm of V(x) per example.
    expected["hetxl"]["noise_diag_scale"] = np.mean(np.asarray(noise.diag_scale))
    expected["hetxl"]["noise_factor_norm"] = np.mean(
        np.sqrt(np.sum(np.asarray(noise.factors) ** 2, axis=(1, 2)))
    )
    options = {"clip": {}, "hetxl": {"sampling": Sampling(train_samples=5, chunk_size=2)}}
    for name, values in expected.items():
        loss = make_loss(name, column_chunk_size=6, **options[name])
        _, metrics = jax.jit(shard_loss(loss, mesh))(outputs, rng)
        for key, value in values.items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=f"{name} {key}")


def test_unknown_loss_and_bad_option_are_named():
    with pytest.raises(ValueError, match="'nope'.*known"):
        make_loss("nope")
    with pytest.raises(ValueError, match="hetxl"):
        make_loss("hetxl", samples=3)


# ------------------------------------------------------------------------------------------
# Compiled memory (XLA's memory analysis of loss + gradient, per device).


def loss_and_grad_peak_bytes(mesh, loss, local_batch, dim=32, factors=4):
    batch = local_batch * DEVICES
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    struct = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)  # noqa: E731
    outputs = {
        "image_embedding": struct(batch, dim),
        "text_embedding": struct(batch, dim),
        "tau": jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated),
        "noise": NoiseParameters(
            struct(batch, dim, factors), struct(batch, dim), struct(batch, dim)
        ),
    }
    sharded = shard_loss(loss, mesh)
    rng = jax.random.key(0)
    compiled = compile_function(jax.value_and_grad(lambda o: sharded(o, rng)[0]), outputs)
    return peak_bytes(compiled)


def test_hetxl_loss_memory_is_flat_in_samples(mesh):
    def peak(samples):
        loss = make_loss(
            "hetxl", sampling=Sampling(train_samples=samples, chunk_size=8), column_chunk_size=64
        )
        return loss_and_grad_peak_bytes(mesh, loss, local_batch=32)

    small, large = peak(16), peak(128)
    assert large <= 1.25 * small, (small, large)


def test_hetxl_loss_memory_is_linear_in_the_per_device_batch(mesh):
    def peak(local_batch):
        loss = make_loss(
            "hetxl", sampling=Sampling(train_samples=16, chunk_size=8), column_chunk_size=64
        )
        return loss_and_grad_peak_bytes(mesh, loss, local_batch)

    peaks = {b: peak(b) for b in (32, 128)}
    # 4x the local batch (and so 4x the global batch): a [b, B] logit matrix would grow 16x.
    assert peaks[128] <= 4.4 * peaks[32], peaks
    dense_logits = 8 * 128 * (128 * DEVICES) * 4  # one chunk of samples' [C, b, B] float32 logits
    assert peaks[128] < dense_logits, peaks
