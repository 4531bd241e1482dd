"""Scorer `lora-affinity`: prefer endpoints where the request's LoRA adapter is (or can be) resident."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.config import ConfigError
from epp.datalayer.endpoints import Endpoint
from epp.scheduling.adapters import requested_adapter
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.registry import PluginContext, register


@dataclass(frozen=True, slots=True)
class LoraAffinityParams:
    free_slot: float = 0.8  # score of an endpoint with a free adapter slot (the adapter would be loaded)
    waiting: float = 0.6  # score of an endpoint where the adapter is queued

    def __post_init__(self) -> None:
        for name in ("free_slot", "waiting"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"plugin 'lora-affinity': {name} must be within [0, 1]")


class LoraAffinityScorer:
    """LoRA residency for a request whose target is an adapter: 1.0 adapter running on the endpoint,
    `free_slot` (0.8) a slot is free (running + waiting adapters < max_lora), `waiting` (0.6) the adapter is
    queued there, 0 otherwise. Which targets are adapters: `epp.scheduling.adapters.requested_adapter`. Not an
    adapter: 1 for all (no preference)."""

    name = "lora-affinity"

    def __init__(self, free_slot: float, waiting: float) -> None:
        self.free_slot = free_slot
        self.waiting = waiting

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        adapter = requested_adapter(request, candidates)
        if adapter is None:
            return [1.0] * len(candidates)
        out = []
        for e in candidates:
            m = e.metrics
            if adapter in m.running_loras:
                out.append(1.0)
            elif m.max_lora and len(m.running_loras | m.waiting_loras) < m.max_lora:
                out.append(self.free_slot)
            elif adapter in m.waiting_loras:
                out.append(self.waiting)
            else:
                out.append(0.0)
        return out


@register("lora-affinity", "scorer", LoraAffinityParams)
def _lora(params: LoraAffinityParams, ctx: PluginContext) -> LoraAffinityScorer:
    return LoraAffinityScorer(params.free_slot, params.waiting)
