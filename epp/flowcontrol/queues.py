"""The queues of flow control: one band per priority, one flow per fairness id in a band, FCFS in a flow.

Fairness between the flows of a band is start-time fair queuing: each backlogged flow carries the virtual
start tag of its head request, the band serves the lowest tag, and serving charges the flow its cost:

    tag(flow) = max(V, finish(flow))   when the flow becomes backlogged
    serve the flow with the lowest tag (ties: the flow that became eligible first), then
    V = tag(flow);  finish(flow) = tag(flow) + cost(request);  tag(flow) = finish(flow)

V is the band's virtual time. cost = 1 gives round-robin (equal numbers of requests); cost = the request's
estimated tokens (prompt + requested output) gives token-weighted fairness: a tenant sending long prompts
gets proportionally fewer requests through. A flow that empties is forgotten (its memory is bounded by
the queued requests), and one that returns starts at V: idle time earns no credit.

Everything here is synchronous and clock-free; `controller.py` owns time, limits and outcomes.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from epp.errors import Rejection
from epp.scheduling.interfaces import SchedulingRequest


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """A request held by flow control, and its ticket: the servicer awaits `ready`, then the director reads
    the outcome (`decision` or `rejection`)."""

    request: SchedulingRequest
    subset: frozenset[str] | None  # the gateway's subset hint: the candidates are recomputed at dispatch
    size: int  # request body bytes (the byte limits' unit)
    cost: int  # fairness cost: 1 (round-robin) or estimated tokens (token-weighted)
    enqueued: float  # the controller's clock
    ttl: float  # seconds from `enqueued` before 503
    payload: Any  # the director's own state for finishing the decision at dispatch
    ready: Any = None  # asyncio.Future[None], resolved with the outcome
    flow: Flow | None = None  # while queued
    timer: Any = None  # asyncio.TimerHandle of the next deadline
    outcome: str = ""  # final outcome (metric label) once settled
    decision: Any = None  # the director's Decision when dispatched
    rejection: Rejection | None = None


class Flow:
    """The queued requests of one fairness id in one band, first come first served."""

    __slots__ = ("band", "bytes", "entry", "fairness_id", "finish", "items", "seq", "tag")

    def __init__(self, band: Band, fairness_id: str) -> None:
        self.band = band
        self.fairness_id = fairness_id
        self.items: deque[QueuedRequest] = deque()
        self.bytes = 0
        self.tag = 0.0  # virtual start tag of the head request
        self.finish = 0.0  # virtual finish of the last request served
        self.seq = 0  # when it became eligible (ties between equal tags: earlier first)
        self.entry = -1  # `seq` while the flow has a live heap entry, else -1


@dataclass(slots=True)
class Band:
    """All flows of one priority. `count` and `bytes` are the band's totals (for its limits)."""

    priority: int
    flows: dict[str, Flow] = field(default_factory=dict)
    count: int = 0
    bytes: int = 0
    vtime: float = 0.0
    _heap: list[tuple[float, int, Flow]] = field(default_factory=list)
    _seq: int = 0

    def add(self, item: QueuedRequest) -> None:
        """Queue `item` at the back of its flow (created, and made eligible at tag max(V, 0), if new)."""
        fairness_id = item.request.fairness_id
        flow = self.flows.get(fairness_id)
        if flow is None:
            flow = self.flows[fairness_id] = Flow(self, fairness_id)
            flow.tag = self.vtime
            self._push(flow)
        flow.items.append(item)
        flow.bytes += item.size
        item.flow = flow
        self.count += 1
        self.bytes += item.size

    def remove(self, item: QueuedRequest) -> None:
        """Take `item` out wherever it is in its flow (client gone, TTL, shutdown); no fairness charge."""
        flow = item.flow
        assert flow is not None and flow.band is self
        if flow.items and flow.items[0] is item:
            flow.items.popleft()
        else:
            flow.items.remove(item)
        self._taken(flow, item)

    def pop_flow(self) -> Flow | None:
        """The eligible flow with the lowest tag, out of the heap (the caller serves its head and calls
        `served`, or puts it back with `put_back`). None when no flow is eligible."""
        heap = self._heap
        while heap:
            _, seq, flow = heapq.heappop(heap)
            if flow.entry == seq:  # else a stale entry: the flow emptied or was re-pushed
                flow.entry = -1
                return flow
        return None

    def put_back(self, flow: Flow) -> None:
        """A flow popped but not served (its head cannot be dispatched now): eligible again, in the same
        place (same tag, same tie-break)."""
        flow.entry = flow.seq
        heapq.heappush(self._heap, (flow.tag, flow.seq, flow))

    def served(self, flow: Flow) -> QueuedRequest:
        """Dequeue the head of a popped `flow` and charge the flow its cost."""
        item = flow.items.popleft()
        self.vtime = flow.tag
        flow.finish = flow.tag + item.cost
        flow.tag = flow.finish
        self._taken(flow, item)
        if flow.items:
            self._push(flow)
        return item

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.flows.values())

    def _taken(self, flow: Flow, item: QueuedRequest) -> None:
        item.flow = None
        flow.bytes -= item.size
        self.count -= 1
        self.bytes -= item.size
        if not flow.items:
            flow.entry = -1  # its heap entry, if any, is now stale
            del self.flows[flow.fairness_id]

    def _push(self, flow: Flow) -> None:
        self._seq += 1
        flow.seq = flow.entry = self._seq
        heapq.heappush(self._heap, (flow.tag, self._seq, flow))
        if len(self._heap) > 4 * len(self.flows) + 64:  # stale entries pile up: rebuild
            self._heap = [e for e in self._heap if e[2].entry == e[1]]
            heapq.heapify(self._heap)
