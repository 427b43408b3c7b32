"""What every evaluator offers: a full report, the numbers of it for training logs, and both."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any


class Evaluator(abc.ABC):
    """evaluate(params) computes the full report over the whole split; log_scalars(report)
    picks the numbers a training log keeps, so the trainer can keep the report of its last
    evaluation without evaluating twice."""

    @abc.abstractmethod
    def evaluate(self, params) -> dict[str, Any]: ...

    @staticmethod
    @abc.abstractmethod
    def log_scalars(report: Mapping[str, Any]) -> dict[str, float]: ...

    def run(self, params) -> dict[str, float]:
        """log_scalars(evaluate(params))."""
        return self.log_scalars(self.evaluate(params))
