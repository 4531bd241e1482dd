"""Scorer `queue`: the scraped waiting-queue depth, min-max normalised over the candidates."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import NoParams, PluginContext, register
from epp.scheduling.scoring import spread_scores


class QueueScorer:
    """Scraped waiting-queue depth: score = (maxQ − q) / (maxQ − minQ) over the candidates (1 when all
    equal). Upstream default weight 2. Parameters: none."""

    name = "queue"

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        return spread_scores([e.metrics.waiting for e in candidates])


@register("queue", "scorer")
def _queue(params: NoParams, ctx: PluginContext) -> QueueScorer:
    return QueueScorer()
