"""Small, exact statistics for benchmark results (pure)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def is_number(value: Any) -> bool:
    """A real number (bools are not measurements)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def median_of_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per key: the median over the runs that measured it (numbers), else the first value seen.

    A key missing from some runs (an error in one run) is the median of the runs that have it.
    """
    keys: list[str] = []
    for run in runs:
        keys.extend(key for key in run if key not in keys)
    summary: dict[str, Any] = {}
    for key in keys:
        present = [run[key] for run in runs if key in run]
        numbers = [value for value in present if is_number(value)]
        if numbers and len(numbers) == len(present):
            summary[key] = statistics.median(numbers)
        else:
            summary[key] = present[0]
    return summary


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline
