"""The flow controller on a virtual clock (tests/support/virtual_time.py): admission, priority order,
fairness, limits, deadlines, disconnects, shutdown. The gate and the scheduling are stand-ins the tests
steer, so every order and every instant asserted here is exact."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from support.virtual_time import run_virtual

from epp.config import FlowControlConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.flowcontrol import controller as fc
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.queues import QueuedRequest
from epp.scheduling.interfaces import SchedulingRequest

POOL = ["10.0.0.1:8000", "10.0.0.2:8000"]


class Gate:
    """A gate the test opens for a number of dispatches (`room`), or sets per subset."""

    def __init__(self) -> None:
        self.room = 0  # dispatches allowed before it is saturated again
        self.per_subset: dict[frozenset[str] | None, int] = {}

    def saturation(self, request: SchedulingRequest | None, candidates: Sequence[Endpoint]) -> float:
        return 0.0 if self.room > 0 else 1.0

    def dispatched(self, endpoint: Endpoint, request: SchedulingRequest) -> None:
        self.room -= 1

    def started(self, endpoint: Endpoint) -> None:
        pass

    def refresh(self) -> None:
        pass


class Harness:
    def __init__(self, gate: Gate | None = None, pool: list[str] | None = None, **config: Any) -> None:
        self.gate = gate or Gate()
        self.pool = EndpointPool(Endpoint(a) for a in (POOL if pool is None else pool))
        self.config = FlowControlConfig(enabled=True, **config)
        self.sent: list[str] = []  # dispatched request ids, in order
        self.outcomes: list[tuple[str, str, float]] = []
        self.fail: dict[str, Exception] = {}
        self.shedding = 0.0  # the shedding rule's saturation (the detector's thresholds)
        self.flow = FlowController(
            self.config, self.pool, self.gate, self.candidates, self.dispatch, poll_s=lambda: 0.05,
            shedding=lambda candidates: self.shedding,
            record=lambda r, outcome, s: self.outcomes.append((r.request_id, outcome, s)),
        )  # fmt: skip

    def candidates(self, subset: frozenset[str] | None) -> list[Endpoint]:
        endpoints = self.pool.all()
        return endpoints if subset is None else [e for e in endpoints if e.address in subset]

    def dispatch(self, item: QueuedRequest, candidates: list[Endpoint]) -> str:
        request_id = item.request.request_id
        if request_id in self.fail:
            raise self.fail[request_id]
        self.gate.dispatched(candidates[0], item.request)
        self.sent.append(request_id)
        return f"decision for {request_id}"

    def admit(
        self, request_id: str, *, priority: int = 0, tenant: str = "default-flow", size: int = 100,
        subset: frozenset[str] | None = None, tokens: int = 0, max_wait: float | None = None,
    ) -> QueuedRequest | None:  # fmt: skip
        """As the director does: None = dispatched at once; else the queued ticket. Raises Rejection."""
        request = SchedulingRequest(
            request_id, "m", "m", priority=priority, fairness_id=tenant, prompt_tokens=tokens
        )
        if not self.flow.hold(request, self.candidates(subset)):
            self.gate.room -= 1
            self.sent.append(request_id)
            return None
        return self.flow.enqueue(request, subset, size, None, max_wait)

    async def open(self, room: int) -> None:
        """Capacity frees for `room` requests (a first byte, a finish): kick and let the pass run."""
        self.gate.room = room
        self.flow.kick()
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def test_room_and_an_empty_queue_dispatch_at_once() -> None:
    async def main() -> None:
        h = Harness()
        h.gate.room = 1
        assert h.admit("a") is None
        assert h.sent == ["a"] and h.flow.size == 0

    run_virtual(main())


def test_a_saturated_gate_holds_requests_of_every_priority() -> None:
    async def main() -> None:
        h = Harness()
        for request_id, priority in (("standard", 0), ("batch", -1), ("critical", 10)):
            item = h.admit(request_id, priority=priority)
            assert item is not None and not item.ready.done()
        assert h.flow.size == 3
        await h.open(3)
        assert h.sent == ["critical", "standard", "batch"]

    run_virtual(main())


def test_a_sheddable_request_is_shed_while_the_shedding_rule_says_saturated() -> None:
    async def main() -> None:
        h = Harness()
        h.gate.room = 10  # the gate has room: shedding is decided by the detector's own thresholds
        h.shedding = 1.2
        with pytest.raises(Rejection) as info:
            h.admit("batch", priority=-1)
        assert (info.value.status, info.value.code) == (429, "saturated_shed")
        assert "saturation 1.20" in info.value.message and "priority -1" in info.value.message
        assert ("batch", fc.REJECTED_SATURATED, 0.0) in h.outcomes
        assert h.admit("standard") is None  # others are not shed

    run_virtual(main())


def test_bands_are_served_in_strict_priority_order_fcfs_within_a_flow() -> None:
    async def main() -> None:
        h = Harness()
        for i in range(3):
            h.admit(f"low{i}", priority=0)
            h.admit(f"high{i}", priority=10)
            h.admit(f"mid{i}", priority=5)
        for _ in range(9):
            await h.open(1)  # capacity frees one request at a time
        assert h.sent == [f"high{i}" for i in range(3)] + [f"mid{i}" for i in range(3)] + [
            f"low{i}" for i in range(3)
        ]
        assert h.flow.size == 0 and h.flow.bands == {}

    run_virtual(main())


def test_a_flooding_tenant_does_not_starve_the_other() -> None:
    async def main() -> None:
        h = Harness()
        for i in range(20):
            h.admit(f"flood{i}", tenant="flood")
        for i in range(3):
            h.admit(f"light{i}", tenant="light")
        await h.open(6)
        assert h.sent == ["flood0", "light0", "flood1", "light1", "flood2", "light2"]

    run_virtual(main())


def test_token_weighted_fairness_counts_tokens() -> None:
    async def main() -> None:
        h = Harness(fairness="token-weighted")
        for i in range(6):
            h.admit(f"long{i}", tenant="long", tokens=3000)
        for i in range(6):
            h.admit(f"short{i}", tenant="short", tokens=1000)
        await h.open(8)
        # 3 short requests per long one: 6,000 tokens each.
        assert h.sent == ["long0", "short0", "short1", "short2", "long1", "short3", "short4", "short5"]

    run_virtual(main())


def test_a_new_request_waits_behind_queued_ones_of_its_priority_even_with_room() -> None:
    async def main() -> None:
        h = Harness()
        h.admit("first")
        h.gate.room = 1  # room appears (a scrape) before the next pass
        second = h.admit("second")
        assert second is not None  # held: "first" goes first
        await asyncio.sleep(0)  # the pass the admission kicked
        assert h.sent == ["first"] and h.flow.size == 1

    run_virtual(main())


def test_a_higher_priority_request_passes_queued_lower_ones_when_there_is_room() -> None:
    async def main() -> None:
        h = Harness()
        h.admit("low")
        h.gate.room = 1
        assert h.admit("high", priority=1) is None
        assert h.sent == ["high"]

    run_virtual(main())


@pytest.mark.parametrize(
    ("config", "size", "message"),
    [
        ({"max_requests": 2, "band_max_requests": None}, 10, "flow_control.max_requests 2"),
        ({"max_bytes": 2500, "band_max_bytes": None}, 1000, "flow_control.max_bytes 2500"),
        ({"band_max_requests": 2}, 10, "flow_control.band_max_requests 2"),
        ({"band_max_bytes": 2500}, 1000, "flow_control.band_max_bytes 2500"),
    ],
)
def test_limits_answer_429_queue_full_naming_the_limit(config: dict, size: int, message: str) -> None:
    async def main() -> None:
        h = Harness(**config)
        h.admit("a", size=size)
        h.admit("b", size=size)
        with pytest.raises(Rejection) as info:
            h.admit("c", size=size)
        assert (info.value.status, info.value.code) == (429, "queue_full")
        assert message in info.value.message
        assert ("c", fc.REJECTED_CAPACITY, 0.0) in h.outcomes
        assert h.flow.size == 2  # the rejected one left nothing behind

    run_virtual(main())


def test_band_limits_leave_room_for_other_bands() -> None:
    async def main() -> None:
        h = Harness(band_max_requests=1)
        h.admit("standard")
        with pytest.raises(Rejection):
            h.admit("standard-2")
        assert h.admit("critical", priority=10) is not None

    run_virtual(main())


def test_ttl_expiry_is_503_queue_timeout_at_exactly_the_ttl() -> None:
    async def main() -> None:
        h = Harness(ttl_s=2.0, no_endpoints_ttl_s=1.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        item = h.admit("a")
        assert item is not None
        await item.ready
        assert loop.time() - start == pytest.approx(2.0)
        assert item.rejection is not None
        assert (item.rejection.status, item.rejection.code) == (503, "queue_timeout")
        assert "flow_control.ttl_s" in item.rejection.message
        assert h.outcomes == [("a", fc.EVICTED_TTL, pytest.approx(2.0))]
        assert h.flow.size == 0 and h.flow.bytes == 0

    run_virtual(main())


def test_a_bounded_wait_caps_the_ttl_and_says_so() -> None:
    async def main() -> None:
        h = Harness(ttl_s=30.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        item = h.admit("buffered", max_wait=4.5)
        assert item is not None
        await item.ready
        assert loop.time() - start == pytest.approx(4.5)
        assert item.rejection is not None and "buffered_wait_s" in item.rejection.message

    run_virtual(main())


def test_no_endpoints_holds_briefly_then_503_no_endpoints() -> None:
    async def main() -> None:
        h = Harness(pool=[], no_endpoints_ttl_s=3.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        item = h.admit("a", priority=-1)  # even a sheddable one waits for the pool to scale up
        assert item is not None
        await item.ready
        assert loop.time() - start == pytest.approx(3.0)
        assert item.rejection is not None and item.rejection.code == "no_endpoints"
        assert item.outcome == fc.EVICTED_NO_ENDPOINTS

    run_virtual(main())


def test_an_endpoint_appearing_dispatches_the_held_request() -> None:
    async def main() -> None:
        h = Harness(pool=[], no_endpoints_ttl_s=3.0)
        item = h.admit("a")
        assert item is not None
        await asyncio.sleep(1.0)
        h.gate.room = 1
        h.pool.replace([Endpoint("10.0.0.7:8000")])  # scaled up
        await item.ready
        assert item.decision == "decision for a" and item.outcome == fc.DISPATCHED

    run_virtual(main())


def test_endpoints_that_appear_saturated_extend_the_wait_to_the_full_ttl() -> None:
    async def main() -> None:
        h = Harness(pool=[], no_endpoints_ttl_s=3.0, ttl_s=10.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        item = h.admit("a")
        assert item is not None
        await asyncio.sleep(1.0)
        h.pool.replace([Endpoint("10.0.0.7:8000")])  # saturated at once
        await item.ready
        assert loop.time() - start == pytest.approx(10.0)
        assert item.rejection is not None and item.rejection.code == "queue_timeout"

    run_virtual(main())


def test_the_pool_emptying_shortens_the_wait_to_the_no_endpoints_ttl() -> None:
    async def main() -> None:
        h = Harness(no_endpoints_ttl_s=2.0, ttl_s=30.0)
        loop = asyncio.get_running_loop()
        item = h.admit("a")
        assert item is not None
        await asyncio.sleep(5.0)
        emptied = loop.time()
        h.pool.replace([])
        await item.ready
        assert loop.time() - emptied == pytest.approx(2.0)
        assert item.rejection is not None and item.rejection.code == "no_endpoints"

    run_virtual(main())


def test_no_endpoints_ttl_zero_lets_the_request_fail_at_once() -> None:
    async def main() -> None:
        h = Harness(pool=[], no_endpoints_ttl_s=0.0)
        assert h.admit("a") is None  # to the scheduler, which answers 503 no_endpoints

    run_virtual(main())


def test_room_seen_by_a_scrape_dispatches_within_one_poll_period() -> None:
    async def main() -> None:
        h = Harness()
        loop = asyncio.get_running_loop()
        item = h.admit("a")
        assert item is not None
        await asyncio.sleep(0.01)
        h.gate.room = 1  # nothing kicks: only the periodic check can see it
        opened = loop.time()
        await item.ready
        assert 0 < loop.time() - opened <= 0.05 + 1e-9
        assert h.sent == ["a"]

    run_virtual(main())


def test_a_client_gone_while_queued_frees_its_slot_at_once() -> None:
    async def main() -> None:
        h = Harness()
        a = h.admit("a", size=300)
        b = h.admit("b", size=200)
        assert a is not None and b is not None
        assert h.flow.cancel(a) is None
        assert (h.flow.size, h.flow.bytes) == (1, 200)
        assert a.outcome == fc.EVICTED_CANCELLED
        await h.open(5)
        assert h.sent == ["b"]
        assert (h.flow.size, h.flow.bytes, h.flow.bands) == (0, 0, {})

    run_virtual(main())


def test_cancel_after_dispatch_hands_back_the_decision_to_release() -> None:
    async def main() -> None:
        h = Harness()
        a = h.admit("a")
        assert a is not None
        await h.open(1)
        assert h.flow.cancel(a) == "decision for a"

    run_virtual(main())


def test_shutdown_answers_every_queued_request_and_later_held_ones() -> None:
    async def main() -> None:
        h = Harness()
        items = [h.admit(f"r{i}", priority=i % 3) for i in range(5)]
        await h.flow.close()
        for item in items:
            assert item is not None and item.ready.done()
            assert item.rejection is not None
            assert (item.rejection.status, item.rejection.code) == (503, "shutting_down")
        assert h.flow.size == 0
        with pytest.raises(Rejection) as info:
            h.admit("late")
        assert info.value.code == "shutting_down"
        h.gate.room = 1
        assert h.admit("with room") is None  # still served while the picker drains

    run_virtual(main())


def test_a_failing_dispatch_fails_only_that_request() -> None:
    async def main() -> None:
        h = Harness()
        a, b, c = h.admit("a"), h.admit("b"), h.admit("c")
        h.fail["a"] = Rejection(503, "no_endpoints", "filter removed all")
        h.fail["b"] = RuntimeError("a bug")
        await h.open(3)
        assert a is not None and a.rejection is not None and a.rejection.code == "no_endpoints"
        assert b is not None and b.rejection is not None and b.rejection.status == 500
        assert c is not None and c.decision == "decision for c"

    run_virtual(main())


def test_requests_for_other_endpoints_are_not_blocked_by_a_saturated_subset() -> None:
    class PerSubset(Gate):
        def saturation(self, request: SchedulingRequest | None, candidates: Sequence[Endpoint]) -> float:
            return 1.0 if candidates[0].address == POOL[0] else 0.0

    async def main() -> None:
        h = Harness(gate=PerSubset())
        blocked = h.admit("on-1", subset=frozenset({POOL[0]}), tenant="a")
        assert blocked is not None
        # Held behind "on-1" (same band), but another flow: it goes as soon as the pass sees room there.
        assert h.admit("on-2", subset=frozenset({POOL[1]}), tenant="b") is not None
        await asyncio.sleep(0)
        assert h.sent == ["on-2"] and not blocked.ready.done()

    run_virtual(main())
