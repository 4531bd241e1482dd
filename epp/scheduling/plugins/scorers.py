"""Built-in load and LoRA scorers. Each returns one score in [0, 1] per candidate, higher is better."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.config import ConfigError
from epp.datastore.endpoints import Endpoint
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.registry import PluginContext, params_of, register


def spread_scores(values: Sequence[float]) -> list[float]:
    """(max − v) / (max − min) per value: 1 for the least loaded, 0 for the most; all 1 when equal."""
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        return [1.0] * len(values)
    span = high - low
    return [(high - v) / span for v in values]


class QueueScorer:
    """Scraped waiting-queue depth: score = (maxQ − q) / (maxQ − minQ) over the candidates (1 when all
    equal). Upstream default weight 2. Parameters: none."""

    name = "queue"

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return spread_scores([e.metrics.waiting for e in candidates])


class KVCacheScorer:
    """KV-cache utilisation: score = 1 − kv_usage. Upstream default weight 2. Parameters: none."""

    name = "kv-cache"

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
        return [1.0 - e.metrics.kv_usage for e in candidates]


class LoraAffinityScorer:
    """LoRA residency for a request whose target is an adapter: 1.0 adapter running on the endpoint,
    `free_slot` (0.8) a slot is free (running + waiting adapters < max_lora), `waiting` (0.6) the adapter is
    queued there, 0 otherwise. A request's target counts as an adapter when the config marks it `lora: true`
    or any candidate reports it running or waiting. Not an adapter: 1 for all (no preference)."""

    name = "lora-affinity"

    def __init__(self, free_slot: float, waiting: float) -> None:
        self.free_slot = free_slot
        self.waiting = waiting

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
        adapter = request.lora_adapter
        if adapter is None:
            target = request.target_model
            if not any(
                target in e.metrics.running_loras or target in e.metrics.waiting_loras for e in candidates
            ):
                return [1.0] * len(candidates)
            adapter = target
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


class InflightScorer:
    """The picker's own in-flight load, seen before the next scrape (bursts): score by
    `spread_scores` of requests, of estimated tokens (prompt + max output), or their mean (`both`,
    default). Parameters: mode = requests | tokens | both."""

    name = "inflight"

    def __init__(self, mode: str) -> None:
        if mode not in ("requests", "tokens", "both"):
            raise ConfigError(f"plugin 'inflight': mode must be requests, tokens or both, got {mode!r}")
        self.mode = mode

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
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


@register("queue", "scorer")
def _queue(params: Mapping[str, Any], ctx: PluginContext) -> QueueScorer:
    params_of(params, "queue")
    return QueueScorer()


@register("kv-cache", "scorer")
def _kv(params: Mapping[str, Any], ctx: PluginContext) -> KVCacheScorer:
    params_of(params, "kv-cache")
    return KVCacheScorer()


@register("lora-affinity", "scorer")
def _lora(params: Mapping[str, Any], ctx: PluginContext) -> LoraAffinityScorer:
    p = params_of(params, "lora-affinity", free_slot=0.8, waiting=0.6)
    return LoraAffinityScorer(p["free_slot"], p["waiting"])


@register("inflight", "scorer")
def _inflight(params: Mapping[str, Any], ctx: PluginContext) -> InflightScorer:
    p = params_of(params, "inflight", mode="both")
    return InflightScorer(p["mode"])
