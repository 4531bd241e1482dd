"""Picker `max-score`: the highest weighted total wins."""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import NoParams, PluginContext, register

_EPSILON = 1e-9


class MaxScorePicker:
    """Highest total wins; equal totals (within 1e-9) are broken at random, so identical scores never
    always favour the same replica. Fallbacks follow in descending total. Parameters: none."""

    name = "max-score"

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
        if count == 1:
            best = max(totals)
            ties = [i for i, t in enumerate(totals) if t >= best - _EPSILON]
            index = ties[0] if len(ties) == 1 else ties[self._rng.randrange(len(ties))]
            return [candidates[index]]
        # Totals equal to 9 decimals (float noise) are ties; a random key breaks them.
        keys = [(round(t, 9), self._rng.random()) for t in totals]
        order = sorted(range(len(candidates)), key=keys.__getitem__, reverse=True)
        return [candidates[i] for i in order[:count]]


@register("max-score", "picker")
def _max(params: NoParams, ctx: PluginContext) -> MaxScorePicker:
    return MaxScorePicker(ctx.rng)
