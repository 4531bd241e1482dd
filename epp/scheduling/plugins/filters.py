"""Built-in filters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epp.datastore.endpoints import Endpoint
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.registry import PluginContext, params_of, register


class SubsetHintFilter:
    """Keep only endpoints the gateway listed in `x-gateway-destination-endpoint-subset` (request metadata
    namespace `envoy.lb.subset_hint`). No hint: all pass. A hint with no eligible endpoint empties the list
    (the scheduler answers 503 subset_empty). Parameters: none."""

    name = "subset-hint"

    def filter(self, request: SchedulingRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        subset = request.subset
        if subset is None:
            return candidates
        return [e for e in candidates if e.address in subset]


class HealthyFilter:
    """Drop endpoints whose metrics endpoint is unreachable (the scraper's verdict). If that would drop
    every candidate, keep them all: a dead metrics port is not proof of a dead model server, and a 503 for
    the whole pool is worse than a try. Parameters: none."""

    name = "healthy"

    def filter(self, request: SchedulingRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        kept = [e for e in candidates if e.reachable]
        return kept or candidates


@register("subset-hint", "filter")
def _subset(params: Mapping[str, Any], ctx: PluginContext) -> SubsetHintFilter:
    params_of(params, "subset-hint")
    return SubsetHintFilter()


@register("healthy", "filter")
def _healthy(params: Mapping[str, Any], ctx: PluginContext) -> HealthyFilter:
    params_of(params, "healthy")
    return HealthyFilter()
