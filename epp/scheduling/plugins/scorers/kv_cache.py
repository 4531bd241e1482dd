"""Scorer `kv-cache`: free KV-cache room."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import NoParams, PluginContext, register


class KVCacheScorer:
    """KV-cache utilisation: score = 1 − kv_usage. Upstream default weight 2. Parameters: none."""

    name = "kv-cache"

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        return [1.0 - e.metrics.kv_usage for e in candidates]


@register("kv-cache", "scorer")
def _kv(params: NoParams, ctx: PluginContext) -> KVCacheScorer:
    return KVCacheScorer()
