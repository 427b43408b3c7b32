"""How Monte-Carlo samples of heteroscedastic noise are drawn: one block for every consumer.

The classification heads (HET, HET-XL), the contrastive HET-XL loss and the evaluators' MC metrics
all read this one dataclass (the config's top-level `sampling` block), so a setting has one name
and one default wherever noise is sampled.
"""

from __future__ import annotations

import dataclasses

# Keys that once lived elsewhere, and where they are now: configs still carrying them get an error
# naming the new key instead of having the value silently ignored.
MOVED_KEYS = {
    ("model", "noise", "train_samples"): "sampling.train_samples",
    ("model", "noise", "eval_samples"): "sampling.eval_samples",
    ("model", "noise", "sample_chunk_size"): "sampling.chunk_size",
    ("model", "noise", "share_samples_across_batch"): "sampling.share_across_batch",
    ("loss", "num_samples"): "sampling.train_samples",
    ("loss", "sample_chunk_size"): "sampling.chunk_size",
    ("loss", "share_samples_across_batch"): "sampling.share_across_batch",
}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Attributes:
    train_samples: S, samples per example in each training step.
    eval_samples: S in evaluation (the MC prediction of heads and evaluators).
    chunk_size: samples evaluated at once; peak memory depends on it, not on S.
    share_across_batch: one set of standard-normal draws for the whole batch (cheaper draws,
      correlated examples), instead of independent draws per example.
    """

    train_samples: int = 16
    eval_samples: int = 16
    chunk_size: int = 8
    share_across_batch: bool = False

    def __post_init__(self):
        # The block's checks (data.config_blocks.build_block reports them, all at once).
        problems = []
        for name in ("train_samples", "eval_samples", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r}: expected an integer >= 1")
        if not isinstance(self.share_across_batch, bool):
            problems.append(
                f"share_across_batch={self.share_across_batch!r}: expected True or False"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def samples(self, train: bool) -> int:
        return self.train_samples if train else self.eval_samples


def pop_moved_keys(values: dict) -> list[str]:
    """Removes the keys of MOVED_KEYS from a config (nested dicts, changed in place) and returns
    one line for each, naming where it belongs now."""
    problems = []
    for path, new in MOVED_KEYS.items():
        block = values
        for key in path[:-1]:
            block = block.get(key) if isinstance(block, dict) else None
        if isinstance(block, dict) and path[-1] in block:
            del block[path[-1]]
            problems.append(f"{'.'.join(path)} has moved to {new} (one sampling block for all)")
    return problems
