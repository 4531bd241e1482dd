"""The capacity gate: may one more request go to these endpoints now, or must it wait in the picker?

A gate answers with a saturation level for a request and the endpoints it may use: below 1.0 there is room,
at or above 1.0 the request is held (flow control) or shed (sheddable requests). It also hears of the
picker's own dispatches and first response bytes, so it can see a burst before the next scrape shows it.
`SaturationGate` is the default; a gate built on predicted latency (headroom to each request's objective)
can replace it by implementing `CapacityGate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.requestcontrol.admission import SaturationDetector
from epp.scheduling.interfaces import SchedulingRequest


@runtime_checkable
class CapacityGate(Protocol):
    def saturation(self, request: SchedulingRequest | None, candidates: Sequence[Endpoint]) -> float:
        """The saturation of `candidates` for `request` (None: the level alone, for metrics): >= 1.0 means
        hold the request; below 1.0 there is room. Never called with no candidates."""
        ...

    def dispatched(self, endpoint: Endpoint, request: SchedulingRequest) -> None:
        """The picker chose `endpoint` for `request` (counted before any scrape can show it)."""
        ...

    def started(self, endpoint: Endpoint) -> None:
        """A request sent to `endpoint` no longer waits there: its first response byte arrived (it left the
        server's queue and its prefill is done), or it ended without one. Once per dispatched request."""
        ...

    def refresh(self) -> None:
        """Drop any cached view: the next answer must reflect the latest scrape (a dispatch pass begins)."""
        ...


@dataclass(slots=True)
class _Sent:
    """The picker's own traffic to one endpoint since its scrape stamped `stamp` (`updated_at`)."""

    stamp: float
    requests: int = 0  # dispatched minus started since the scrape (>= 0): what the scrape cannot show yet
    tokens: int = 0  # prompt tokens dispatched since the scrape: KV the scrape cannot show yet
    unstarted: int = 0  # dispatched and not started, whenever sent: waiting or in prefill at the server


class SaturationGate:
    """The saturation detector's formula (epp/requestcontrol/admission.py) with the picker's own traffic
    added, so a burst is seen before the next scrape shows it:

        waiting'(e) = max(waiting(e) + sent(e), unstarted(e))
        kv'(e)      = kv_usage(e) + sent_tokens(e) / (num_blocks(e) x block_size(e))  (if the shape is known)
        sat(e)      = max(waiting'(e) / queue_threshold, kv'(e) / kv_threshold)   (1.0: stale, unreachable)
        sat         = mean over the candidates of sat(e)

    sent(e) counts requests dispatched to e since its last scrape less those started since then (>= 0),
    sent_tokens(e) their prompt tokens; both restart at every scrape (`metrics.updated_at` changes).
    unstarted(e) counts the picker's requests at e that have not started (no first byte yet): waiting, or
    in prefill, which an engine reports as running, so it bounds how many prompts a server is still working
    through before the next one would start. Thresholds: the gate's (`flow_control.queue_threshold` 1,
    `kv_threshold` 0.9 by default); staleness: `scheduling.saturation`'s (0.2 s or 3 scrape periods).

    Cost: the per-endpoint terms of the whole pool (requests without a subset hint) are kept, so admitting
    a request is O(1) instead of a pass over the pool: they are recomputed when older than `RESCAN_S`
    (scrapes come every 50 ms), when they add up to saturated (holding or shedding is always decided on a
    fresh pass), and when a dispatch pass begins (`refresh`); the picker's own dispatches and starts
    update their endpoint's term at once."""

    RESCAN_S = 0.005

    def __init__(self, detector: SaturationDetector, pool: EndpointPool) -> None:
        self.detector = detector
        self.pool = pool
        self._sent: dict[Endpoint, _Sent] = {}
        self._pool_view = _PoolView()
        pool.on_removed(self._forget)

    def saturation(self, request: SchedulingRequest | None, candidates: Sequence[Endpoint]) -> float:
        if not candidates:
            return 1.0
        now = self.detector.clock()
        view = self._pool_view
        if candidates is self.pool.all():  # no subset hint: the kept terms of the pool
            if (
                candidates is not view.endpoints
                or now - view.at > self.RESCAN_S
                or view.total >= len(candidates)
            ):
                self._scan(candidates, now)
            return view.total / len(candidates)
        stale = self.detector.staleness(len(self.pool))
        return sum(self._term(e, now, stale) for e in candidates) / len(candidates)

    def dispatched(self, endpoint: Endpoint, request: SchedulingRequest) -> None:
        stamp = endpoint.metrics.updated_at
        s = self._sent.get(endpoint)
        if s is None:
            s = self._sent[endpoint] = _Sent(stamp)
        elif s.stamp != stamp:
            s.stamp, s.requests, s.tokens = stamp, 0, 0
        s.requests += 1
        s.tokens += request.prompt_tokens
        s.unstarted += 1
        self._update(endpoint)

    def started(self, endpoint: Endpoint) -> None:
        s = self._sent.get(endpoint)
        if s is None:
            return
        if s.unstarted > 0:
            s.unstarted -= 1
        if s.requests > 0 and s.stamp == endpoint.metrics.updated_at:
            s.requests -= 1
        self._update(endpoint)

    def refresh(self) -> None:
        self._pool_view.endpoints = None

    def _term(self, e: Endpoint, now: float, stale: float) -> float:
        """sat(e) as the class docstring defines it."""
        m = e.metrics
        updated = m.updated_at
        if not e.reachable or updated == 0.0 or now - updated > stale:
            return 1.0
        waiting = m.waiting
        kv = m.kv_usage
        s = self._sent.get(e)
        if s is not None:
            if s.stamp == updated:
                waiting += s.requests
                if s.tokens and m.num_blocks and m.block_size:
                    kv += s.tokens / (m.num_blocks * m.block_size)
            if s.unstarted > waiting:
                waiting = s.unstarted
        q = waiting / self.detector.queue_threshold
        k = kv / self.detector.kv_threshold
        return q if q > k else k

    def _scan(self, endpoints: list[Endpoint], now: float) -> None:
        stale = self.detector.staleness(len(endpoints))
        view = self._pool_view
        view.terms = {e: self._term(e, now, stale) for e in endpoints}
        view.total = sum(view.terms.values())
        view.endpoints, view.at = endpoints, now

    def _update(self, endpoint: Endpoint) -> None:
        view = self._pool_view
        old = view.terms.get(endpoint)
        if old is not None and view.endpoints is not None:
            new = self._term(endpoint, self.detector.clock(), self.detector.staleness(len(view.endpoints)))
            view.terms[endpoint] = new
            view.total += new - old

    def _forget(self, endpoint: Endpoint) -> None:
        self._sent.pop(endpoint, None)


@dataclass(slots=True)
class _PoolView:
    """The per-endpoint terms of the whole pool at time `at`, and their sum."""

    endpoints: list[Endpoint] | None = None  # the pool's list they were computed for (None: recompute)
    at: float = 0.0
    terms: dict[Endpoint, float] = field(default_factory=dict)
    total: float = 0.0
