"""Comparisons across seeds: a difference is a win or a loss only beyond the seed spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["Spread", "spread", "verdict"]


class Spread:
    """Mean and sample standard deviation of one optimizer's final losses over seeds."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = [float(v) for v in values if v is not None and math.isfinite(v)]
        self.n = len(self.values)
        self.mean = statistics.mean(self.values) if self.values else math.nan
        self.std = statistics.stdev(self.values) if self.n > 1 else math.nan

    def __repr__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f} (n={self.n})"


def spread(values: Sequence[float]) -> Spread:
    return Spread(values)


def verdict(candidate: Spread, reference: Spread, lower_is_better: bool = True) -> str:
    """``"win"``, ``"loss"`` or ``"within spread"`` of ``candidate`` against ``reference``.

    The difference of the means counts only when it exceeds the seeds' spread, sqrt(s_c² + s_r²) (the
    standard deviation of the difference of one run of each); with fewer than two seeds on either side
    nothing can be called (``"one seed"``).
    """
    if candidate.n < 2 or reference.n < 2:
        return "one seed"
    difference = candidate.mean - reference.mean
    if abs(difference) <= math.hypot(candidate.std, reference.std):
        return "within spread"
    better = difference < 0 if lower_is_better else difference > 0
    return "win" if better else "loss"
