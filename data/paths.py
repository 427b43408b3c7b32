"""User paths: local files, or URLs (gs://..., ram://...) that only tf.io.gfile opens.

Local files are read with plain Python, so that code which only checks a config (a tokenizer's
vocabulary size, say) runs where TensorFlow is not installed (data/lazy_tf.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from data.lazy_tf import tf


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/run (anything with a scheme)."""
    return "://" in str(path)


def read_bytes(path: str) -> bytes:
    path = str(path)
    if not is_remote(path):
        return Path(path).read_bytes()
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def is_file(path: str) -> bool:
    path = str(path)
    if not is_remote(path):
        return os.path.isfile(path)
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)
