"""Scorer `latency`: predict each candidate's time to first token for this request; the smallest wins.

    uncached(e)  = prompt tokens − tokens e is believed to hold (the approximate prefix index, in tokens:
                   absolute match length, not a fraction)
    backlog(e)   = uncached prompt tokens the picker sent to e and has not seen answered (first response chunk
                   not yet back): the queue the picker built itself, which scraped metrics show late
                   + requests the scrape shows waiting beyond the picker's own × their mean uncached size
    TTFT(e)      = θ0 + θ1 × (backlog(e) + uncached(e)) / 1000 + θ2 × running(e) / 10 + θ3 × [adapter to
                   load] + θ4 × KV pressure + θ5 × [no free adapter slot]
                   θ(e) learned online per endpoint (`model.LatencyModel`). An adapter counts as resident
                   when the scrape shows it running or waiting, or the picker sent it there recently (an LRU
                   of max_lora adapters per endpoint: vLLM does not report idle resident adapters).
    cost(e)      = TTFT(e) + eviction_weight × θ1 × evicted(e) / 1000: evicted(e) = tokens of other prompts
                   this one would push out of e's full prefix cache (by the index: its uncached tokens beyond
                   the room left), priced at e's prefill rate: their next requests pay that recompute. So cold
                   prompts go where the cache has room, and no replica's cache is churned while others idle.
    speed(e)     = min cost / cost(e)  (1 for the best; 1 as well within `tie_s` of the best, so that nearly
                   equal costs are spread by the picker's random tie-break instead of herding)
    score(e)     = (speed(e) + locality × held(e)) / (1 + locality): held(e) = the share of the prompt's
                   blocks e holds (for a LoRA request, the mean of that and whether the adapter is
                   resident). locality 0.5 by default: the prediction misses costs it cannot see (a warm
                   conversation's next turns, KV-full queueing), and a modest pull towards the cache that
                   already holds the prompt was better or equal on 6 of 7 workloads in the virtual lab.

The herding guard is the backlog term itself, in seconds: every request sent to the cache-warm replica adds
its uncached tokens to that replica's predicted wait until another replica is predicted faster.

Objectives (`x-llm-d-slo-ttft-ms`, `x-llm-d-slo-tpot-ms`): candidates predicted to meet them are preferred
(the others score ×0.01); time per output token is predicted as `tpot_base_s + tpot_per_running_s ×
(running + 1)` (priors, not learned yet). A sheddable request (priority < 0) that no candidate is predicted to
serve within its objectives is refused: 429 `slo_unattainable`.

Learning: `pre_request` (the request was sent) records the features it was sent with and adds its uncached
tokens to the endpoint's backlog; `response_started` removes them and, for a streamed request, teaches the
model the observed dispatch → first chunk time; `response_complete` removes them if no chunk ever came. The
scorer owns its approximate prefix index (the prefix-cache scorer, used here for matching and learning only)
and forgets endpoints that leave the pool.

Parameters: the prefix index's as `prefix-cache` (block_chars, max_blocks, capacity_blocks, auto_capacity),
prior rates (overhead_s 0.04, s_per_ktoken 0.15, s_per_10_running 0.005, lora_load_s 0.03, kv_full_s 0.3,
slot_wait_s 1.0), eviction_weight 0.5, locality 0.5, forgetting 0.99, tie_s 0.005, tpot_base_s 0.010,
tpot_per_running_s 0.0001, learn true.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.config import ConfigError
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.scheduling.adapters import requested_adapter
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.latency.model import Features, LatencyModel, Rates, features
from epp.scheduling.plugins.prefix_cache.index import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_MAX_BLOCKS,
)
from epp.scheduling.plugins.prefix_cache.scorer import PrefixCacheParams, PrefixCacheScorer
from epp.scheduling.registry import PluginContext, register

INFEASIBLE = 0.01  # score factor of candidates predicted to miss the request's objectives
PRIOR = Rates()  # the model's prior rates: the defaults of the parameters of the same names


@dataclass(frozen=True, slots=True)
class LatencyParams:
    overhead_s: float = PRIOR.overhead_s
    s_per_ktoken: float = PRIOR.s_per_ktoken
    s_per_10_running: float = PRIOR.s_per_10_running
    lora_load_s: float = PRIOR.lora_load_s
    kv_full_s: float = PRIOR.kv_full_s
    slot_wait_s: float = PRIOR.slot_wait_s
    eviction_weight: float = 0.5
    locality: float = 0.5
    forgetting: float = 0.99
    tie_s: float = 0.005
    tpot_base_s: float = 0.010
    tpot_per_running_s: float = 0.0001
    learn: bool = True
    block_chars: int = DEFAULT_BLOCK_CHARS
    max_blocks: int = DEFAULT_MAX_BLOCKS
    capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS
    auto_capacity: bool = True

    def __post_init__(self) -> None:
        for name in (
            "overhead_s", "s_per_ktoken", "s_per_10_running", "lora_load_s", "kv_full_s", "slot_wait_s",
            "tie_s", "eviction_weight", "locality",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"plugin 'latency': {name} must be >= 0")
        if not 0.5 < self.forgetting <= 1.0:
            raise ConfigError("plugin 'latency': forgetting must be in (0.5, 1]")
        PrefixCacheParams(
            block_chars=self.block_chars, max_blocks=self.max_blocks, capacity_blocks=self.capacity_blocks
        )  # the index's own checks


class _Prediction:
    """This scorer's part of a request's CycleState: per candidate, the prediction and its parts."""

    __slots__ = (
        "addresses", "backlog", "cost", "dispatched", "kv", "lora", "ratio", "running", "slot_wait", "tpot",
        "ttft", "uncached",
    )  # fmt: skip

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.uncached: list[float] = []
        self.backlog: list[float] = []
        self.running: list[float] = []
        self.lora: list[bool] = []
        self.slot_wait: list[bool] = []
        self.kv: list[float] = []
        self.ttft: list[float] = []
        self.cost: list[float] = []  # ttft + eviction cost: what the choice minimises
        self.ratio: list[float] = []  # share of the prompt's blocks the endpoint holds
        self.tpot: list[float] = []
        # Set once sent: (address, uncached tokens held in its backlog, features it was sent with, adapter).
        self.dispatched: tuple[str, float, Features, str | None] | None = None


class _Backlog:
    """Per endpoint: uncached prompt tokens (and requests) sent and not yet answered; mean request size;
    KV tokens sent since the endpoint's last scrape (its scraped KV use does not show them yet)."""

    __slots__ = (
        "adapters", "mean_uncached", "pending_adapters", "recent_kv", "requests", "scraped_at", "tokens",
    )  # fmt: skip

    def __init__(self) -> None:
        self.adapters: dict[str, None] = {}  # adapters sent here, least recently first (at most max_lora)
        self.pending_adapters: dict[str, int] = {}  # adapters of the unanswered requests here
        self.tokens = 0.0
        self.requests = 0
        self.mean_uncached = 0.0
        self.recent_kv = 0.0
        self.scraped_at = 0.0


class LatencyScorer:
    """Predicted time to first token per candidate (see the module docstring); the lowest scores 1."""

    name = "latency"

    def __init__(self, params: LatencyParams) -> None:
        self.params = params
        self.model = LatencyModel(
            Rates(
                params.overhead_s,
                params.s_per_ktoken,
                params.s_per_10_running,
                params.lora_load_s,
                params.kv_full_s,
                params.slot_wait_s,
            ),
            forgetting=params.forgetting,
        )
        self.prefix = PrefixCacheScorer(
            PrefixCacheParams(
                load_gap=0.0,
                block_chars=params.block_chars,
                max_blocks=params.max_blocks,
                capacity_blocks=params.capacity_blocks,
                auto_capacity=params.auto_capacity,
            )
        )
        self._backlogs: dict[str, _Backlog] = {}

    def attach(self, pool: EndpointPool) -> None:
        self.prefix.attach(pool)
        pool.on_removed(self._forget)

    def _forget(self, endpoint: Endpoint) -> None:
        self.model.forget(endpoint.address)
        self._backlogs.pop(endpoint.address, None)

    def _backlog(self, address: str) -> _Backlog:
        backlog = self._backlogs.get(address)
        if backlog is None:
            backlog = self._backlogs[address] = _Backlog()
        return backlog

    # -- scoring ----------------------------------------------------------------------------------------

    def predict(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> _Prediction:
        block_tokens = self.prefix.block_tokens
        matched = self.prefix.matched_blocks(request, state, candidates)
        prompt = float(request.prompt_tokens)
        adapter = requested_adapter(request, candidates)
        state[self.name + ".adapter"] = adapter
        out = _Prediction()
        model = self.model
        index = self.prefix.index
        eviction_weight = self.params.eviction_weight
        blocks_total = len(state[self.prefix.name].hashes) or 1
        for endpoint, blocks in zip(candidates, matched, strict=True):
            address = endpoint.address
            m = endpoint.metrics
            uncached = max(0.0, prompt - blocks * block_tokens)
            backlog = self._backlogs.get(address)
            queued = 0.0
            kv = m.kv_usage
            capacity = m.num_blocks * m.block_size
            if capacity:  # this request's own need: does it fit beside what is there?
                kv += (uncached + request.max_tokens) / capacity
            if backlog is not None:
                queued = backlog.tokens + max(0.0, m.waiting - backlog.requests) * backlog.mean_uncached
                if capacity and backlog.scraped_at == m.updated_at:
                    kv += backlog.recent_kv / capacity
            lora = slot_wait = False
            if adapter is not None and adapter not in m.running_loras and adapter not in m.waiting_loras:
                lora = backlog is None or adapter not in backlog.adapters
                if lora and m.max_lora:  # every slot held by a running adapter (the scrape's, or just sent)
                    busy = m.running_loras.union(backlog.pending_adapters) if backlog else m.running_loras
                    slot_wait = len(busy) >= m.max_lora
            x = features(queued + uncached, m.running, lora, kv, slot_wait)
            out.addresses.append(address)
            out.uncached.append(uncached)
            out.backlog.append(queued)
            out.running.append(m.running)
            out.lora.append(lora)
            out.slot_wait.append(slot_wait)
            out.kv.append(kv)
            ttft = model.predict(address, x)
            out.ttft.append(ttft)
            room = index.room(address)
            evicted = 0.0 if room is None else max(0.0, uncached - room * block_tokens)
            out.cost.append(ttft + eviction_weight * model.theta(address)[1] * evicted / 1000.0)
            # Locality: the share of the prompt held; for an adapter request, also whether the adapter is.
            ratio = blocks / blocks_total
            out.ratio.append(ratio if adapter is None else (ratio + (0.0 if lora else 1.0)) / 2)
            out.tpot.append(self.params.tpot_base_s + self.params.tpot_per_running_s * (m.running + 1))
        state[self.name] = out
        return out

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        p = self.predict(request, state, candidates)
        ttft = p.ttft
        cost = p.cost
        best = min(cost)
        tie = best + self.params.tie_s
        scores = [1.0 if c <= tie else best / c for c in cost]
        locality = self.params.locality
        if locality:
            scores = [(s + locality * r) / (1.0 + locality) for s, r in zip(scores, p.ratio, strict=True)]
        slo_ttft, slo_tpot = request.slo_ttft_s, request.slo_tpot_s
        if slo_ttft is None and slo_tpot is None:
            return scores
        feasible = [
            (slo_ttft is None or t <= slo_ttft) and (slo_tpot is None or tp <= slo_tpot)
            for t, tp in zip(ttft, p.tpot, strict=True)
        ]
        if any(feasible):
            return [s if ok else s * INFEASIBLE for s, ok in zip(scores, feasible, strict=True)]
        if request.priority < 0:
            wanted = " and ".join(
                f"{label} <= {value * 1000:.0f} ms"
                for label, value in (("TTFT", slo_ttft), ("TPOT", slo_tpot))
                if value is not None
            )
            raise Rejection(
                429,
                "slo_unattainable",
                f"no endpoint is predicted to serve this sheddable request within its objective ({wanted}; "
                f"best predicted TTFT {min(ttft) * 1000:.0f} ms, TPOT {min(p.tpot) * 1000:.1f} ms); "
                "retry later",
            )
        return scores

    # -- lifecycle --------------------------------------------------------------------------------------

    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None:
        """Sent to `endpoint` (again with the served endpoint if the gateway reports another one)."""
        self.prefix.pre_request(request, state, endpoint)
        p: _Prediction | None = state.get(self.name)
        if p is None:
            return
        if p.dispatched is not None:  # moved to another endpoint: take the backlog along
            self._release(p)
        try:
            i = p.addresses.index(endpoint.address)
            uncached = p.uncached[i]
            x = features(p.backlog[i] + uncached, p.running[i], p.lora[i], p.kv[i], p.slot_wait[i])
        except ValueError:  # not a candidate we predicted for: assume nothing cached
            uncached = float(request.prompt_tokens)
            x = features(uncached, endpoint.metrics.running, False, endpoint.metrics.kv_usage)
        backlog = self._backlog(endpoint.address)
        backlog.tokens += uncached
        backlog.requests += 1
        if backlog.scraped_at != endpoint.metrics.updated_at:  # a new scrape shows what was sent before it
            backlog.scraped_at = endpoint.metrics.updated_at
            backlog.recent_kv = 0.0
        backlog.recent_kv += uncached + request.max_tokens
        adapter = state.get(self.name + ".adapter")
        if adapter is not None:
            backlog.pending_adapters[adapter] = backlog.pending_adapters.get(adapter, 0) + 1
            backlog.adapters.pop(adapter, None)
            backlog.adapters[adapter] = None
            while len(backlog.adapters) > max(1, endpoint.metrics.max_lora or 1):
                del backlog.adapters[next(iter(backlog.adapters))]
        backlog.mean_uncached += 0.1 * (uncached - backlog.mean_uncached)
        p.dispatched = (endpoint.address, uncached, x, adapter)

    def response_started(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, seconds: float
    ) -> None:
        p: _Prediction | None = state.get(self.name)
        if p is None or p.dispatched is None:
            return
        address, _, x, _ = p.dispatched
        self._release(p)
        # Only a streamed response's first chunk is its first token; a whole response arrives at the end.
        if self.params.learn and request.stream and address == endpoint.address:
            self.model.observe(address, x, seconds)

    def response_complete(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, status: int
    ) -> None:
        p: _Prediction | None = state.get(self.name)
        if p is not None and p.dispatched is not None:
            self._release(p)

    def _release(self, p: _Prediction) -> None:
        assert p.dispatched is not None
        address, uncached, _, adapter = p.dispatched
        p.dispatched = None
        backlog = self._backlogs.get(address)
        if backlog is not None:
            backlog.tokens = max(0.0, backlog.tokens - uncached)
            backlog.requests = max(0, backlog.requests - 1)
            if adapter is not None:
                left = backlog.pending_adapters.get(adapter, 0) - 1
                if left > 0:
                    backlog.pending_adapters[adapter] = left
                else:
                    backlog.pending_adapters.pop(adapter, None)

    # -- what operators see -----------------------------------------------------------------------------

    def explain(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        p: _Prediction | None = state.get(self.name)
        if p is None:
            p = self.predict(request, state, candidates)
        rows = []
        for i, address in enumerate(p.addresses):
            theta = self.model.theta(address)
            rows.append(
                {
                    "ttft_ms": p.ttft[i] * 1000,
                    "cost_ms": p.cost[i] * 1000,
                    "overhead_ms": theta[0] * 1000,
                    "prefill_ms": theta[1] * (p.backlog[i] + p.uncached[i]) / 1000 * 1000,
                    "backlog_tokens": p.backlog[i],
                    "uncached_tokens": p.uncached[i],
                    "running_ms": theta[2] * p.running[i] / 10 * 1000,
                    "lora_load_ms": theta[3] * 1000 if p.lora[i] else 0.0,
                    "slot_wait_ms": theta[5] * 1000 if p.slot_wait[i] else 0.0,
                    "kv_use": p.kv[i],
                    "kv_pressure_ms": theta[4] * features(0, 0, False, p.kv[i])[4] * 1000,
                    "tpot_ms": p.tpot[i] * 1000,
                }
            )
        return {"prompt_tokens": float(request.prompt_tokens)}, rows

    def endpoint_details(self, endpoint: Endpoint) -> dict[str, float]:
        theta = self.model.theta(endpoint.address)
        backlog = self._backlogs.get(endpoint.address)
        return {
            "backlog_tokens": backlog.tokens if backlog else 0.0,
            "observations": float(self.model.observations(endpoint.address)),
            "overhead_ms": theta[0] * 1000,
            "ms_per_ktoken": theta[1] * 1000,
            "ms_per_10_running": theta[2] * 1000,
            "lora_load_ms": theta[3] * 1000,
            "kv_full_ms": theta[4] * 1000,
            "slot_wait_ms": theta[5] * 1000,
            **self.prefix.endpoint_details(endpoint),
        }

    def gauges(self) -> dict[str, float]:
        return self.prefix.gauges()


@register("latency", "scorer", LatencyParams)
def _latency(params: LatencyParams, ctx: PluginContext) -> LatencyScorer:
    scorer = LatencyScorer(params)
    scorer.attach(ctx.pool)
    return scorer
