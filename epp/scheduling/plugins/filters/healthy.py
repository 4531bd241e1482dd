"""Filter `healthy`: drop endpoints whose metrics endpoint is unreachable."""

from __future__ import annotations

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import NoParams, PluginContext, register


class HealthyFilter:
    """Drop endpoints whose metrics endpoint is unreachable (the scraper's verdict). If that would drop
    every candidate, keep them all: a dead metrics port is not proof of a dead model server, and a 503 for
    the whole pool is worse than a try. Parameters: none."""

    name = "healthy"

    def filter(
        self, request: SchedulingRequest, state: CycleState, candidates: list[Endpoint]
    ) -> list[Endpoint]:
        kept = [e for e in candidates if e.reachable]
        return kept or candidates


@register("healthy", "filter")
def _healthy(params: NoParams, ctx: PluginContext) -> HealthyFilter:
    return HealthyFilter()
