"""Helpers shared by scorers."""

from __future__ import annotations

from collections.abc import Sequence


def spread_scores(values: Sequence[float]) -> list[float]:
    """(max − v) / (max − min) per value: 1 for the least loaded, 0 for the most; all 1 when equal."""
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        return [1.0] * len(values)
    span = high - low
    return [(high - v) / span for v in values]
