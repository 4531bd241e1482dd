"""Prefix-cache affinity with a load guard against herding.

    match(e)    = leading consecutive prompt blocks endpoint e is believed to hold (approximate index)
    ratio(e)    = match(e) / blocks(request)                        (0 when the prompt has no full block)
    load(e)     = max(in-flight requests we sent it, scraped running + waiting)
    gap(e)      = load(e) − min over candidates of load
    score(e)    = ratio(e) × min(1, load_gap / gap(e))             (full affinity while gap ≤ load_gap)

So affinity yields smoothly once the warm replica runs `load_gap` requests ahead of the least-loaded one:
the excess goes to the next-best replica (which may hold part of the prefix and learns the rest), while
the warm replica keeps the share it can absorb: locality is rebalanced, not thrown away.
Parameters: load_gap (default 4 requests; 0 disables the guard). The index learns the picked endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.config import ConfigError, PrefixConfig
from epp.datastore.endpoints import Endpoint
from epp.datastore.prefix_index import PrefixIndex, block_hashes
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.registry import PluginContext, params_of, register

TOKENS_PER_BLOCK_CHARS = 4  # our blocks are block_chars characters ≈ block_chars / 4 tokens


def endpoint_load(endpoint: Endpoint) -> float:
    m = endpoint.metrics
    scraped = m.running + m.waiting
    return endpoint.inflight_requests if endpoint.inflight_requests > scraped else scraped


class PrefixCacheScorer:
    name = "prefix-cache"

    def __init__(self, index: PrefixIndex, prefix: PrefixConfig, load_gap: float) -> None:
        self.index = index
        self.block_chars = prefix.block_chars
        self.max_blocks = prefix.max_blocks
        self.auto_capacity = prefix.auto_capacity
        self.load_gap = load_gap
        self._capacity_seen: dict[str, int] = {}

    def hashes(self, request: SchedulingRequest) -> list[int]:
        if request.prefix_hashes is None:
            request.prefix_hashes = block_hashes(
                request.prompt,
                seed_model=request.target_model,
                cache_salt=request.cache_salt,
                block_chars=self.block_chars,
                max_blocks=self.max_blocks,
            )
        return request.prefix_hashes

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
        hashes = self.hashes(request)
        if not hashes:
            return [0.0] * len(candidates)
        matches = self.index.match(hashes, [e.address for e in candidates])
        total = len(hashes)
        scores = [m / total for m in matches]
        if self.load_gap > 0 and any(scores):
            loads = [endpoint_load(e) for e in candidates]
            floor = min(loads) + self.load_gap
            for i, load in enumerate(loads):
                if scores[i] and load > floor:
                    scores[i] *= self.load_gap / (load - floor + self.load_gap)
        return scores

    def observe(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        hashes = self.hashes(request)
        if not hashes:
            return
        if self.auto_capacity:
            self._maybe_resize(endpoint)
        self.index.record(endpoint.address, hashes)

    def _maybe_resize(self, endpoint: Endpoint) -> None:
        m = endpoint.metrics
        if not (m.num_blocks and m.block_size):
            return
        tokens = m.num_blocks * m.block_size
        if self._capacity_seen.get(endpoint.address) != tokens:
            self._capacity_seen[endpoint.address] = tokens
            self.index.set_capacity(
                endpoint.address, max(1, tokens * TOKENS_PER_BLOCK_CHARS // self.block_chars)
            )


@register("prefix-cache", "scorer")
def _prefix(params: Mapping[str, Any], ctx: PluginContext) -> PrefixCacheScorer:
    p = params_of(params, "prefix-cache", load_gap=4.0)
    if p["load_gap"] < 0:
        raise ConfigError("plugin 'prefix-cache': load_gap must be >= 0")
    return PrefixCacheScorer(ctx.prefix_index, ctx.config.scheduling.prefix, p["load_gap"])
