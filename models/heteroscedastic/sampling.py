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


# Copies of a chunk's f32 logit block live at once in a step (the logits, their log-softmax, its
# gradient and XLA's temporaries): the byte model behind an automatic chunk size, checked
# against XLA's compiled memory analysis in tests/models/test_heteroscedastic.py.
LIVE_LOGIT_COPIES = 4


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Attributes:
    train_samples: S, samples per example in each training step.
    eval_samples: S in evaluation (the MC prediction of heads and evaluators).
    chunk_size: samples evaluated at once; None (the default) picks the largest chunk whose
      logits fit chunk_bytes. All S samples in one chunk are differentiated directly (one
      forward and two backward logit matmuls, as DET's); several chunks keep peak memory flat in
      S by recomputing each chunk's logits in the backward pass (a fourth matmul).
    chunk_bytes: bytes per device the logits of one chunk may take (LIVE_LOGIT_COPIES copies of
      f32[chunk, batch, classes]) when chunk_size is None.
    share_across_batch: one set of standard-normal draws for the whole batch (cheaper draws,
      correlated examples), instead of independent draws per example.
    """

    train_samples: int = 16
    eval_samples: int = 16
    chunk_size: int | None = None
    chunk_bytes: int = 2**30
    share_across_batch: bool = False

    def __post_init__(self):
        # The block's checks (data.config_blocks.build_block reports them, all at once).
        problems = []
        names = ["train_samples", "eval_samples", "chunk_bytes"]
        if self.chunk_size is not None:
            names.append("chunk_size")
        for name in names:
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

    def samples_per_chunk(self, num_samples: int, logit_elements_per_sample: int) -> int:
        """Samples evaluated at once, given the f32 logits one sample forms on a device.

        chunk_size if set; else as many as fit chunk_bytes (at least 1, at most num_samples).
        """
        if self.chunk_size is not None:
            return max(1, min(self.chunk_size, num_samples))
        per_sample = LIVE_LOGIT_COPIES * 4 * max(1, logit_elements_per_sample)
        return max(1, min(num_samples, self.chunk_bytes // per_sample))


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
