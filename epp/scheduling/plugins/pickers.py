"""Built-in pickers: order candidates by weighted total, chosen first, then fallbacks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from epp.datastore.endpoints import Endpoint
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.registry import PluginContext, params_of, register

_EPSILON = 1e-9


class MaxScorePicker:
    """Highest total wins; equal totals (within 1e-9) are broken at random, so identical scores never
    always favour the same replica. Fallbacks follow in descending total. Parameters: none."""

    name = "max-score"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(
        self, request: SchedulingRequest, candidates: Sequence[Endpoint], totals: Sequence[float], count: int
    ) -> list[Endpoint]:
        if count == 1:
            best = max(totals)
            ties = [i for i, t in enumerate(totals) if t >= best - _EPSILON]
            index = ties[0] if len(ties) == 1 else ties[self._rng.randrange(len(ties))]
            return [candidates[index]]
        # Totals equal to 9 decimals (float noise) are ties; a random key breaks them.
        keys = [(round(t, 9), self._rng.random()) for t in totals]
        order = sorted(range(len(candidates)), key=keys.__getitem__, reverse=True)
        return [candidates[i] for i in order[:count]]


class WeightedRandomPicker:
    """Chosen with probability ∝ total (all-zero totals: uniform); fallbacks drawn the same way without
    replacement (Efraimidis–Spirakis keys u^(1/w)). Spreads load when scores are close. Parameters: none."""

    name = "weighted-random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(
        self, request: SchedulingRequest, candidates: Sequence[Endpoint], totals: Sequence[float], count: int
    ) -> list[Endpoint]:
        rng = self._rng
        if max(totals) <= 0:
            weights = [1.0] * len(totals)
        else:
            weights = [t if t > 0 else 0.0 for t in totals]
        keys = [rng.random() ** (1.0 / w) if w > 0 else -1.0 + rng.random() * 1e-3 for w in weights]
        order = sorted(range(len(candidates)), key=keys.__getitem__, reverse=True)
        return [candidates[i] for i in order[:count]]


@register("max-score", "picker")
def _max(params: Mapping[str, Any], ctx: PluginContext) -> MaxScorePicker:
    params_of(params, "max-score")
    return MaxScorePicker(ctx.rng)


@register("weighted-random", "picker")
def _weighted(params: Mapping[str, Any], ctx: PluginContext) -> WeightedRandomPicker:
    params_of(params, "weighted-random")
    return WeightedRandomPicker(ctx.rng)
