"""Scorer `prefix-cache`: prefix-cache affinity with a load guard against herding.

    match(e)    = leading consecutive prompt blocks endpoint e is believed to hold (approximate index)
    ratio(e)    = match(e) / blocks(request)                        (0 when the prompt has no full block)
    load(e)     = max(in-flight requests we sent it, scraped running + waiting)     (`Endpoint.load`)
    gap(e)      = load(e) − min over candidates of load
    score(e)    = ratio(e) × min(1, load_gap / gap(e))             (full affinity while gap ≤ load_gap)

So affinity yields smoothly once the warm replica runs `load_gap` requests ahead of the least-loaded one:
the excess goes to the next-best replica (which may hold part of the prefix and learns the rest), while
the warm replica keeps the share it can absorb: locality is rebalanced, not thrown away.

The scorer owns its index (`index.PrefixIndex`): it teaches it the endpoint each request is sent to
(`pre_request`, after the decision reply has left) and forgets endpoints that leave the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.config import CHARS_PER_TOKEN, ConfigError
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.prefix_cache.index import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_MAX_BLOCKS,
    PrefixIndex,
    block_hashes,
)
from epp.scheduling.registry import PluginContext, register


@dataclass(frozen=True, slots=True)
class PrefixCacheParams:
    load_gap: float = 4.0  # requests the warm endpoint may run ahead of the least loaded (0: no guard)
    block_chars: int = DEFAULT_BLOCK_CHARS  # characters per index block: 16 tokens x ~4 chars
    max_blocks: int = DEFAULT_MAX_BLOCKS  # blocks hashed and matched per request (4,096 tokens)
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS  # per endpoint, when the server exports no cache shape
    auto_capacity: bool = True  # size each endpoint from the server's cache_config_info when exported

    def __post_init__(self) -> None:
        if self.load_gap < 0:
            raise ConfigError("plugin 'prefix-cache': load_gap must be >= 0")
        for name, low in (("block_chars", 4), ("max_blocks", 1), ("capacity_blocks", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"plugin 'prefix-cache': {name} must be >= {low}")


class _RequestState:
    """This scorer's part of a request's CycleState: the prompt's block hashes and the last match."""

    __slots__ = ("hashes", "matches")

    def __init__(self, hashes: list[int]) -> None:
        self.hashes = hashes
        self.matches: list[int] | None = None


def load_guard(scores: list[float], candidates: Sequence[Endpoint], load_gap: float) -> list[float]:
    """The herding guard of the prefix scorers, in place: an endpoint whose load (requests) exceeds the
    least loaded candidate's by more than `load_gap` keeps score × load_gap / (load − min load) of its
    affinity (0 = no guard). So a warm cache attracts requests until its queue costs more than the match."""
    if load_gap > 0 and any(scores):
        loads = [e.load for e in candidates]
        floor = min(loads) + load_gap
        for i, load in enumerate(loads):
            if scores[i] and load > floor:
                scores[i] *= load_gap / (load - floor + load_gap)
    return scores


class PrefixCacheScorer:
    """Prefix-cache affinity: the share of the prompt's leading 64-character blocks an endpoint is believed
    to hold, discounted once the endpoint runs more than `load_gap` requests ahead of the least loaded one.
    Parameters: load_gap (4), block_chars (64), max_blocks (256), capacity_blocks (31,250 per endpoint),
    auto_capacity (true)."""

    name = "prefix-cache"

    def __init__(self, params: PrefixCacheParams, index: PrefixIndex | None = None) -> None:
        self.index = index if index is not None else PrefixIndex(params.capacity_blocks)
        self.block_chars = params.block_chars
        self.max_blocks = params.max_blocks
        self.auto_capacity = params.auto_capacity
        self.load_gap = params.load_gap
        self._capacity_seen: dict[str, int] = {}

    def attach(self, pool: EndpointPool) -> None:
        """Forget endpoints when they leave `pool`."""
        pool.on_removed(self._forget)

    def _forget(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint.address)
        self._capacity_seen.pop(endpoint.address, None)

    def _state(self, request: SchedulingRequest, state: CycleState) -> _RequestState:
        mine = state.get(self.name)
        if mine is None:
            mine = state[self.name] = _RequestState(
                block_hashes(
                    request.prompt,
                    seed_model=request.target_model,
                    cache_salt=request.cache_salt,
                    block_chars=self.block_chars,
                    max_blocks=self.max_blocks,
                )
            )
        return mine  # type: ignore[no-any-return]

    @property
    def block_tokens(self) -> float:
        """Prompt tokens per index block (64 characters / 4 characters per token = 16)."""
        return self.block_chars / CHARS_PER_TOKEN

    def matched_blocks(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[int]:
        """Leading prompt blocks each candidate is believed to hold (kept in the request's state)."""
        mine = self._state(request, state)
        if not mine.hashes:
            mine.matches = [0] * len(candidates)
        else:
            mine.matches = self.index.match(mine.hashes, [e.address for e in candidates])
        return mine.matches

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        hashes = self._state(request, state).hashes
        if not hashes:
            return [0.0] * len(candidates)
        matches = self.matched_blocks(request, state, candidates)
        total = len(hashes)
        return load_guard([m / total for m in matches], candidates, self.load_gap)

    # -- lifecycle --------------------------------------------------------------------------------------

    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None:
        """The request went to `endpoint`: it now holds the prompt's blocks."""
        hashes = self._state(request, state).hashes
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
            self.index.set_capacity(endpoint.address, max(1, tokens * CHARS_PER_TOKEN // self.block_chars))

    # -- what operators see -----------------------------------------------------------------------------

    def explain(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        mine = self._state(request, state)
        matches = mine.matches or [0] * len(candidates)
        return {"prompt_blocks": float(len(mine.hashes))}, [{"matched_blocks": float(m)} for m in matches]

    def endpoint_details(self, endpoint: Endpoint) -> dict[str, float]:
        return {"index_blocks": float(self.index.entries(endpoint.address))}

    def gauges(self) -> dict[str, float]:
        stats = self.index.stats()
        out = {"inference_extension_prefix_indexer_size": float(stats["total_entries"])}
        if stats["queried_blocks"]:
            out["inference_extension_prefix_indexer_hit_ratio"] = (
                stats["hit_blocks"] / stats["queried_blocks"]
            )
        return out


@register("prefix-cache", "scorer", PrefixCacheParams)
def _prefix(params: PrefixCacheParams, ctx: PluginContext) -> PrefixCacheScorer:
    scorer = PrefixCacheScorer(params)
    scorer.attach(ctx.pool)
    return scorer
