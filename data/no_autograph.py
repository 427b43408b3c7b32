"""Dataset functions traced as written, without autograph's source rewriting.

tf.data runs autograph on every function given to map, filter, scan, flat_map or interleave
unless told not to. The pipeline's functions have no Python control flow on tensors, so the
rewrite adds nothing, and the first rewrite of the pipeline's modules costs about 3.5 s of CPU
in every new process (a training command, each process of a multi-process job).

Only the functions handed to tf.data outside any other dataset function need the mark: while a
marked function is traced, the datasets it builds (a source's `read`, a nested `map`) are
traced without autograph too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from data.lazy_tf import tf


def no_autograph(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, marked so that tf.data traces it without converting it (or what it calls)."""
    return tf.autograph.experimental.do_not_convert(fn)
