"""Tests mirror the packages (tests/models, tests/contrastive, tests/data, tests/scripts)."""

from pathlib import Path

# The repository root: the working directory of subprocesses that run `python -m ...`.
REPO = Path(__file__).resolve().parent.parent
