"""Scorer `inflight`: the picker's own in-flight load per endpoint, seen before the next scrape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.config import ConfigError
from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import PluginContext, register
from epp.scheduling.scoring import spread_scores


@dataclass(frozen=True, slots=True)
class InflightParams:
    mode: str = "both"  # requests | tokens | both

    def __post_init__(self) -> None:
        if self.mode not in ("requests", "tokens", "both"):
            raise ConfigError(f"plugin 'inflight': mode must be requests, tokens or both, got {self.mode!r}")


class InflightScorer:
    """The picker's own in-flight load, seen before the next scrape (bursts): score by
    `spread_scores` of requests, of estimated tokens (prompt + max output), or their mean (`both`,
    default). Parameters: mode = requests | tokens | both."""

    name = "inflight"

    def __init__(self, mode: str) -> None:
        InflightParams(mode)
        self.mode = mode

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        if self.mode == "requests":
            return spread_scores([e.inflight_requests for e in candidates])
        if self.mode == "tokens":
            return spread_scores([e.inflight_tokens for e in candidates])
        requests = [e.inflight_requests for e in candidates]
        tokens = [e.inflight_tokens for e in candidates]
        r_low, r_high = min(requests), max(requests)
        t_low, t_high = min(tokens), max(tokens)
        # The mean of the two spread scores, in one pass (0.5 / span folded into the factors).
        r_factor = 0.5 / (r_high - r_low) if r_high > r_low else 0.0
        t_factor = 0.5 / (t_high - t_low) if t_high > t_low else 0.0
        base = (0.5 if r_factor == 0.0 else 0.0) + (0.5 if t_factor == 0.0 else 0.0)
        return [
            base + (r_high - r) * r_factor + (t_high - t) * t_factor
            for r, t in zip(requests, tokens, strict=True)
        ]


@register("inflight", "scorer", InflightParams)
def _inflight(params: InflightParams, ctx: PluginContext) -> InflightScorer:
    return InflightScorer(params.mode)
