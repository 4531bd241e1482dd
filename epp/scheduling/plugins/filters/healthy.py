"""Filter `healthy`: drop endpoints whose metrics endpoint is unreachable."""

from __future__ import annotations

from dataclasses import dataclass

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import PluginContext, register


@dataclass(frozen=True, slots=True)
class HealthyParams:
    # When every candidate is unreachable: False (default) keeps none, so the picker answers 503
    # no_endpoints naming this filter; True keeps them all and routes blind (for pools whose /metrics is
    # served apart from the inference port and may fail while serving works).
    keep_all_if_none: bool = False


class HealthyFilter:
    """Drop endpoints the scraper calls unreachable (`scheduling.scrape` failures in a row; the metrics
    page is served on the inference port, so a refused scrape is a refused request). If every candidate is
    unreachable the request gets the picker's 503 `no_endpoints` ("filter 'healthy' removed all ..."),
    not Envoy's connect error after a try; `keep_all_if_none: true` routes blind instead. Parameters:
    keep_all_if_none = false."""

    name = "healthy"

    def __init__(self, keep_all_if_none: bool = False) -> None:
        self.keep_all_if_none = keep_all_if_none

    def filter(
        self, request: SchedulingRequest, state: CycleState, candidates: list[Endpoint]
    ) -> list[Endpoint]:
        kept = [e for e in candidates if e.reachable]
        return candidates if not kept and self.keep_all_if_none else kept


@register("healthy", "filter", HealthyParams)
def _healthy(params: HealthyParams, ctx: PluginContext) -> HealthyFilter:
    return HealthyFilter(params.keep_all_if_none)
