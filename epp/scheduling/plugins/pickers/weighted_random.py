"""Picker `weighted-random`: chosen with probability proportional to the weighted total."""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import NoParams, PluginContext, register


class WeightedRandomPicker:
    """Chosen with probability ∝ total (all-zero totals: uniform); fallbacks drawn the same way without
    replacement (Efraimidis–Spirakis keys u^(1/w)). Spreads load when scores are close. Parameters: none."""

    name = "weighted-random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(
        self,
        request: SchedulingRequest,
        state: CycleState,
        candidates: Sequence[Endpoint],
        totals: Sequence[float],
        count: int,
    ) -> list[Endpoint]:
        rng = self._rng
        if max(totals) <= 0:
            weights = [1.0] * len(totals)
        else:
            weights = [t if t > 0 else 0.0 for t in totals]
        keys = [rng.random() ** (1.0 / w) if w > 0 else -1.0 + rng.random() * 1e-3 for w in weights]
        order = sorted(range(len(candidates)), key=keys.__getitem__, reverse=True)
        return [candidates[i] for i in order[:count]]


@register("weighted-random", "picker")
def _weighted(params: NoParams, ctx: PluginContext) -> WeightedRandomPicker:
    return WeightedRandomPicker(ctx.rng)
