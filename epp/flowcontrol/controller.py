"""The flow controller: admits, holds and dispatches requests while the pool is saturated.

Admission of a request whose candidate endpoints are known (`hold`), in this order:

    no endpoint at all             hold (scale from zero), up to no_endpoints_ttl_s (0: let it fail at once)
    sheddable (priority < 0) and   429 saturated_shed: the shedding rule without flow control, on the
      the pool is saturated          saturation detector's own thresholds (`scheduling.saturation`)
    a queued request of priority   hold behind it (strict priority, FCFS within the flow)
      >= its own
    gate saturation >= 1.0         hold (the gate's thresholds are tighter: requests wait here, where
                                     priority applies, rather than in a model server's FCFS queue)
    otherwise                      dispatch now

A held request joins its band and flow (`enqueue`) unless a limit is reached (429 queue_full). Held requests
are dispatched by a dispatch pass: bands from the highest priority down, flows in fair order (queues.py),
each head dispatched while the gate says its candidates have room; the director schedules it right there
(late binding: fresh metrics, fresh in-flight counts) and the waiting stream is woken. A pass runs when
capacity may have freed: a request finished or got its first byte, the pool changed, and every scrape
period while anything is queued (a scrape may have shown room). Passes are coalesced (one per loop turn).

Outcomes (metric label `outcome`, upstream's names where they exist):

    Dispatched               sent to an endpoint (at once, or from the queue)
    RejectedSaturated        sheddable request while saturated: 429 saturated_shed
    RejectedCapacity         a queue limit: 429 queue_full
    RejectedOther            shutting down: 503 shutting_down
    EvictedTTL               waited ttl_s: 503 queue_timeout
    EvictedNoEndpoints       no endpoint appeared in time: 503 no_endpoints
    EvictedContextCancelled  the client went away while queued (no reply: the stream is gone)
    EvictedOther             shutdown while queued (503 shutting_down), or scheduling failed at dispatch

Everything runs on the event loop, synchronously: no locks, and nothing here ever blocks a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from epp.config import FlowControlConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.flowcontrol.gate import CapacityGate
from epp.flowcontrol.queues import Band, QueuedRequest
from epp.scheduling.interfaces import SchedulingRequest

log = logging.getLogger(__name__)

DISPATCHED = "Dispatched"
REJECTED_SATURATED = "RejectedSaturated"
REJECTED_CAPACITY = "RejectedCapacity"
REJECTED_OTHER = "RejectedOther"
EVICTED_TTL = "EvictedTTL"
EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
EVICTED_CANCELLED = "EvictedContextCancelled"
EVICTED_OTHER = "EvictedOther"

# `assess` verdicts
GO, HOLD_SATURATED, HOLD_BEHIND, HOLD_NO_ENDPOINTS, SHED, CLOSED = range(6)

Candidates = Callable[[frozenset[str] | None], list[Endpoint]]
Dispatch = Callable[[QueuedRequest, list[Endpoint]], Any]
Recorder = Callable[[SchedulingRequest, str, float], None]
Level = Callable[[Sequence[Endpoint]], float]


class FlowController:
    """Bands, limits, deadlines and the dispatch pass. `candidates(subset)` gives a request's endpoints now
    (may raise Rejection); `dispatch(item, candidates)` finishes its decision (returns it, or raises
    Rejection); `shedding(candidates)` is the pool's saturation for the shedding rule (>= 1: shed a
    sheddable request; the detector without flow control); `record(request, outcome, seconds in queue)`
    feeds the metrics."""

    def __init__(
        self,
        config: FlowControlConfig,
        pool: EndpointPool,
        gate: CapacityGate,
        candidates: Candidates,
        dispatch: Dispatch,
        *,
        shedding: Level | None = None,
        poll_s: Callable[[], float] = lambda: 0.05,
        record: Recorder | None = None,
        pool_name: str = "default-pool",
    ) -> None:
        self.config = config
        self.pool = pool
        self.gate = gate
        self.candidates = candidates
        self.dispatch = dispatch
        self.shedding = shedding or (lambda candidates: gate.saturation(None, candidates))
        self.poll_s = poll_s
        self.record = record
        self.pool_name = pool_name
        self.token_weighted = config.fairness == "token-weighted"
        self.bands: dict[int, Band] = {}
        self._order: list[int] = []  # band priorities, highest first
        self.size = 0  # queued requests, all bands
        self.bytes = 0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pass_scheduled = False
        self._poll: asyncio.TimerHandle | None = None
        pool.on_changed(self._pool_changed)

    # -- admission --------------------------------------------------------------------------------------

    def assess(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> tuple[int, float]:
        """(verdict, saturation) for a new request; no side effects. The saturation is the shedding rule's
        for a shed request, else the gate's; 0.0 when neither was consulted (no endpoints, or held behind
        queued requests)."""
        if not candidates:
            if self.config.no_endpoints_ttl_s <= 0:
                return GO, 0.0
            return (CLOSED if self.closed else HOLD_NO_ENDPOINTS), 0.0
        if request.priority < 0:
            shed_level = self.shedding(candidates)
            if shed_level >= 1.0:
                return SHED, shed_level
        if self.size and self.queued_ahead(request.priority):
            return (CLOSED if self.closed else HOLD_BEHIND), 0.0
        level = self.gate.saturation(request, candidates)
        if level < 1.0:
            return GO, level
        return (CLOSED if self.closed else HOLD_SATURATED), level

    def hold(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> bool:
        """True: the request must wait (`enqueue` it); False: dispatch it now. Raises Rejection(429) for a
        sheddable request while saturated, Rejection(503) for a held request while shutting down."""
        verdict, level = self.assess(request, candidates)
        if verdict == GO:
            return False
        if verdict == SHED:
            self._recorded(request, REJECTED_SATURATED)
            raise shed(request, level, self.pool_name)
        if verdict == CLOSED:
            self._recorded(request, REJECTED_OTHER)
            raise shutting_down()
        if verdict == HOLD_BEHIND:
            self.kick()  # the gate may be open: let the queue move first, this request behind it
        return True

    def queued_ahead(self, priority: int) -> int:
        """Queued requests that go before a new request of `priority` (same or higher priority)."""
        return sum(self.bands[p].count for p in self._order if p >= priority)

    def limit_problem(self, priority: int, size: int) -> str | None:
        """Which limit a new request of `priority` and `size` body bytes would break, or None."""
        c = self.config
        if self.size + 1 > c.max_requests:
            return f"{self.size} requests are queued (flow_control.max_requests {c.max_requests})"
        if self.bytes + size > c.max_bytes:
            return f"{self.bytes} bytes are queued (flow_control.max_bytes {c.max_bytes})"
        band = self.bands.get(priority)
        if band is not None:
            if c.band_max_requests is not None and band.count + 1 > c.band_max_requests:
                return (
                    f"{band.count} requests of priority {priority} are queued "
                    f"(flow_control.band_max_requests {c.band_max_requests})"
                )
            if c.band_max_bytes is not None and band.bytes + size > c.band_max_bytes:
                return (
                    f"{band.bytes} bytes of priority {priority} are queued "
                    f"(flow_control.band_max_bytes {c.band_max_bytes})"
                )
        elif c.band_max_bytes is not None and size > c.band_max_bytes:
            return f"the body ({size} bytes) exceeds flow_control.band_max_bytes {c.band_max_bytes}"
        return None

    def enqueue(
        self,
        request: SchedulingRequest,
        subset: frozenset[str] | None,
        size: int,
        payload: Any,
        max_wait_s: float | None = None,
    ) -> QueuedRequest:
        """Queue a held request; its `ready` future resolves with the outcome. Raises Rejection(429
        queue_full) when a limit is reached. `max_wait_s` caps the TTL (BUFFERED bodies: Envoy's message
        timeout)."""
        problem = self.limit_problem(request.priority, size)
        if problem is not None:
            self._recorded(request, REJECTED_CAPACITY)
            raise Rejection(
                429, "queue_full", f"flow control queue is full: {problem}; request rejected, retry later"
            )
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        ttl = self.config.ttl_s if max_wait_s is None else min(self.config.ttl_s, max_wait_s)
        cost = max(1, request.estimated_tokens) if self.token_weighted else 1
        item = QueuedRequest(request, subset, size, cost, now, ttl, payload, loop.create_future())
        band = self.bands.get(request.priority)
        if band is None:
            band = self.bands[request.priority] = Band(request.priority)
            self._order = sorted(self.bands, reverse=True)
        band.add(item)
        self.size += 1
        self.bytes += size
        deadline = now + ttl
        if not len(self.pool):
            deadline = min(deadline, now + self.config.no_endpoints_ttl_s)
        item.timer = loop.call_at(deadline, self._expire, item)
        if self._poll is None:
            self._poll = loop.call_later(self.poll_s(), self._tick)
        return item

    # -- leaving the queue ------------------------------------------------------------------------------

    def cancel(self, item: QueuedRequest) -> Any:
        """The client went away (or its stream ended) while waiting: free the slot at once. Returns the
        decision made for it if it had already been dispatched (the caller releases it), else None."""
        if item.flow is not None:
            self._settle(item, EVICTED_CANCELLED)
            return None
        return item.decision

    async def close(self) -> None:
        """Shutting down: every queued request gets 503 shutting_down now; later arrivals that would have
        to wait get it at once. Requests with room are still dispatched."""
        self.closed = True
        for item in list(self._items()):
            self._settle(item, EVICTED_OTHER, shutting_down())
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def _expire(self, item: QueuedRequest) -> None:
        if item.flow is None:
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        end = item.enqueued + item.ttl
        waited = now - item.enqueued
        if not len(self.pool):
            self._settle(item, EVICTED_NO_ENDPOINTS, no_endpoints(waited, self.config.no_endpoints_ttl_s))
        elif now < end:  # endpoints appeared since the no-endpoints deadline was set: wait for the full TTL
            item.timer = loop.call_at(end, self._expire, item)
        else:
            self._settle(item, EVICTED_TTL, queue_timeout(waited, item.ttl, item.ttl < self.config.ttl_s))

    def _pool_changed(self) -> None:
        loop = self._loop
        if not self.size or loop is None:
            return
        if len(self.pool):
            self.kick()  # endpoints appeared
            return
        # The pool emptied: held requests wait at most no_endpoints_ttl_s more.
        limit = loop.time() + self.config.no_endpoints_ttl_s
        for item in self._items():
            if item.timer is None or item.timer.when() > limit:
                if item.timer is not None:
                    item.timer.cancel()
                item.timer = loop.call_at(limit, self._expire, item)

    def _settle(
        self, item: QueuedRequest, outcome: str, rejection: Rejection | None = None, decision: Any = None
    ) -> None:
        flow = item.flow
        if flow is not None:
            flow.band.remove(item)
            self._forget(item, flow.band)
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        item.outcome, item.rejection, item.decision = outcome, rejection, decision
        if self.record is not None and self._loop is not None:
            self.record(item.request, outcome, self._loop.time() - item.enqueued)
        if item.ready is not None and not item.ready.done():
            item.ready.set_result(None)

    def _forget(self, item: QueuedRequest, band: Band) -> None:
        self.size -= 1
        self.bytes -= item.size
        if not band.count:
            del self.bands[band.priority]
            self._order = sorted(self.bands, reverse=True)
        if not self.size and self._poll is not None:
            self._poll.cancel()
            self._poll = None

    # -- dispatch ---------------------------------------------------------------------------------------

    def kick(self) -> None:
        """Capacity may have freed: run a dispatch pass soon (coalesced: at most one per loop turn)."""
        if self.size and not self._pass_scheduled and self._loop is not None:
            self._pass_scheduled = True
            self._loop.call_soon(self._kicked)

    def _kicked(self) -> None:
        self._pass_scheduled = False
        self.dispatch_pass()

    def _tick(self) -> None:
        self._poll = None
        self.dispatch_pass()
        if self.size and self._loop is not None:
            self._poll = self._loop.call_later(self.poll_s(), self._tick)

    def dispatch_pass(self) -> int:
        """Dispatch queued requests while their candidates have room: bands by priority, flows in fair
        order. A candidate set found saturated stays closed for the rest of the pass (dispatching only adds
        load). Returns how many were dispatched."""
        if not self.size:
            return 0
        self.gate.refresh()
        closed: set[frozenset[str] | None] = set()
        dispatched = 0
        for priority in list(self._order):
            band = self.bands.get(priority)
            if band is None:
                continue
            waiting = []
            while band.count:
                flow = band.pop_flow()
                if flow is None:
                    break
                item = flow.items[0]
                if item.subset in closed:
                    waiting.append(flow)
                    continue
                try:
                    candidates = self.candidates(item.subset)
                except Rejection as rejection:  # e.g. the subset no longer names any endpoint
                    band.put_back(flow)
                    self._settle(item, EVICTED_OTHER, rejection)
                    continue
                if not candidates or self.gate.saturation(item.request, candidates) >= 1.0:
                    closed.add(item.subset)
                    waiting.append(flow)
                    continue
                band.served(flow)
                self._forget(item, band)
                try:
                    decision = self.dispatch(item, candidates)
                except Rejection as rejection:
                    self._settle(item, EVICTED_OTHER, rejection)
                    continue
                except Exception:  # our bug: this request fails, the others keep moving
                    log.exception("flow control: dispatching request %s failed", item.request.request_id)
                    self._settle(item, EVICTED_OTHER, internal_error())
                    continue
                self._settle(item, DISPATCHED, decision=decision)
                dispatched += 1
            for flow in waiting:
                if flow.items:
                    band.put_back(flow)
        return dispatched

    # -- views ------------------------------------------------------------------------------------------

    def _items(self) -> Iterator[QueuedRequest]:
        for band in list(self.bands.values()):
            for flow in list(band):
                yield from list(flow.items)

    def snapshot(self) -> list[tuple[str, int, str, str, int, int]]:
        """(fairness id, priority, model, target model, queued requests, queued bytes) for the gauges."""
        out: dict[tuple[str, int, str, str], list[int]] = {}
        for band in self.bands.values():
            for flow in band:
                for item in flow.items:
                    r = item.request
                    entry = out.setdefault((flow.fairness_id, band.priority, r.model, r.target_model), [0, 0])
                    entry[0] += 1
                    entry[1] += item.size
        return [(*key, n, b) for key, (n, b) in out.items()]

    def _recorded(self, request: SchedulingRequest, outcome: str) -> None:
        if self.record is not None:
            self.record(request, outcome, 0.0)


# -- the rejections flow control answers -------------------------------------------------------------------


def shed(request: SchedulingRequest, level: float, pool: str) -> Rejection:
    return Rejection(
        429,
        "saturated_shed",
        f"pool '{pool}' is saturated (saturation {level:.2f} >= 1.0: queues or KV cache at the shedding "
        f"thresholds, or metrics stale); sheddable request (priority {request.priority}) rejected, "
        "retry later",
    )


def queue_timeout(waited: float, ttl: float, buffered: bool) -> Rejection:
    limit = (
        "flow_control.buffered_wait_s: Envoy's message_timeout bounds it"
        if buffered
        else "flow_control.ttl_s"
    )
    return Rejection(
        503,
        "queue_timeout",
        f"the pool stayed saturated: the request waited {waited:.1f} s in the flow-control queue, the limit "
        f"({limit}) is {ttl:g} s; retry later",
    )


def no_endpoints(waited: float, ttl: float) -> Rejection:
    return Rejection(
        503,
        "no_endpoints",
        f"no model-server endpoints are known in the pool: none appeared while the request waited "
        f"{waited:.1f} s (flow_control.no_endpoints_ttl_s {ttl:g} s)",
    )


def shutting_down() -> Rejection:
    return Rejection(503, "shutting_down", "the endpoint picker is shutting down; retry the request")


def internal_error() -> Rejection:
    return Rejection(500, "internal_error", "internal error in the endpoint picker")
