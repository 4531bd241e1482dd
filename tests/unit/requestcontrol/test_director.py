"""The request director: the gateway's subset applied once (before filters and admission), the request's
lifecycle (dispatch → pre_request hooks, served_by, first byte, finish exactly once), and explain as a dry
run of the same steps."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from support.extproc import make_director

from epp.datalayer.endpoints import Endpoint
from epp.errors import Rejection
from epp.requestcontrol.director import Director
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.scheduler import Scheduler

POOL = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000"]
CHAT = {":path": "/v1/chat/completions"}


def body(text: str = "hello", model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return [e.address for e in endpoints]


# -- the subset hint ---------------------------------------------------------------------------------------


def test_subset_hint_absent_keeps_everyone() -> None:
    director = make_director(POOL)
    assert director.candidates(None) == director.pool.all()


def test_subset_hint_keeps_listed_endpoints_in_pool_order() -> None:
    director = make_director(POOL)
    hint = frozenset({"10.0.0.3:8000", "10.0.0.1:8000", "10.9.9.9:8000"})  # one not in the pool
    assert addresses(director.candidates(hint)) == ["10.0.0.1:8000", "10.0.0.3:8000"]


@pytest.mark.parametrize("hint", [frozenset(), frozenset({"10.9.9.9:8000"})])
def test_subset_hint_with_no_eligible_endpoint_is_503_subset_empty(hint: frozenset[str]) -> None:
    director = make_director(POOL)
    with pytest.raises(Rejection) as info:
        director.decide(CHAT, body(), hint)
    assert info.value.status == 503
    assert info.value.code == "subset_empty"
    assert "subset-hint" in info.value.message


def test_subset_hint_restricts_the_scheduler_choice() -> None:
    director = make_director(POOL, limits={"fallback_endpoints": 2})
    decision = director.decide(CHAT, body(), frozenset({"10.0.0.4:8000"}))
    assert addresses(decision.endpoints) == ["10.0.0.4:8000"]


def test_healthy_after_subset_only_considers_the_subset() -> None:
    director = make_director(POOL)
    director.pool.get("10.0.0.1:8000").reachable = False  # the only endpoint of the subset
    with pytest.raises(Rejection) as info:  # not routed to a reachable endpoint outside the subset
        director.decide(CHAT, body(), frozenset({"10.0.0.1:8000"}))
    assert (info.value.status, info.value.code) == (503, "no_endpoints")
    assert "filter 'healthy' removed all 1 remaining" in info.value.message


def test_empty_pool_is_503_no_endpoints_even_with_a_subset() -> None:
    director = make_director([])
    with pytest.raises(Rejection) as info:
        director.decide(CHAT, body(), frozenset({"10.0.0.1:8000"}))
    assert (info.value.status, info.value.code) == (503, "no_endpoints")


# -- the lifecycle ----------------------------------------------------------------------------------------


class Recorder:
    """A scorer implementing every lifecycle hook, recording what it hears."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def score(self, request: SchedulingRequest, state: CycleState, candidates: list[Endpoint]) -> list[float]:
        state[self.name] = "scored " + request.request_id
        return [0.0] * len(candidates)

    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None:
        self.events.append(("pre_request", state[self.name], endpoint.address))

    def response_started(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, seconds: float
    ) -> None:
        self.events.append(("response_started", endpoint.address, seconds >= 0))

    def response_complete(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, status: int
    ) -> None:
        self.events.append(("response_complete", endpoint.address, status))

    async def aclose(self) -> None:
        self.events.append(("aclose",))


def director_with_recorder() -> tuple[Director, Recorder]:
    base = make_director(POOL[:2])
    recorder = Recorder()
    scheduler = Scheduler(
        base.scheduler.filters, [*base.scheduler.scorers, (recorder, 1.0)], base.scheduler.picker
    )
    return Director(base.config, base.pool, scheduler), recorder


async def test_close_plugins_stops_each_plugins_background_work_once() -> None:
    director, recorder = director_with_recorder()
    await director.close()  # flow control's part: plugins keep running while streams finish
    assert recorder.events == []
    await director.close_plugins()
    assert recorder.events == [("aclose",)]


def test_hooks_see_the_request_state_in_order_and_finish_runs_once() -> None:
    director, recorder = director_with_recorder()
    decision = director.decide({**CHAT, "x-request-id": "r9"}, body())
    chosen = decision.destination
    assert recorder.events == []  # nothing learned before the reply leaves
    director.dispatched(decision)
    director.response_started(decision)
    director.response_started(decision)  # reported once
    director.finished(decision, 200)
    director.finished(decision, 200)  # idempotent for the hooks and the in-flight count
    assert recorder.events == [
        ("pre_request", "scored r9", chosen),
        ("response_started", chosen, True),
        ("response_complete", chosen, 200),
    ]
    assert all(e.inflight_requests == 0 for e in director.pool)


def test_served_by_moves_the_count_and_tells_the_plugins() -> None:
    director, recorder = director_with_recorder()
    decision = director.decide({**CHAT, "x-request-id": "r1"}, body())
    picked = director.pool.get(decision.destination)
    other = next(e for e in director.pool if e is not picked)
    director.dispatched(decision)
    director.served_by(decision, other.address)
    assert (picked.inflight_requests, other.inflight_requests) == (0, 1)
    director.finished(decision, 200)
    assert recorder.events[1] == ("pre_request", "scored r1", other.address)
    assert recorder.events[-1] == ("response_complete", other.address, 200)
    assert other.inflight_requests == 0


# -- explain ----------------------------------------------------------------------------------------------


def test_explain_is_a_dry_run_and_names_the_subset_as_the_dropping_step() -> None:
    director = make_director(POOL)
    result = director.explain(CHAT, body("x" * 500), frozenset({"10.0.0.2:8000", "10.0.0.3:8000"}))
    assert result.rejection is None
    dropped = {c.address: c.dropped_by for c in result.candidates}
    assert dropped["10.0.0.1:8000"] == "subset-hint" and dropped["10.0.0.4:8000"] == "subset-hint"
    assert dropped["10.0.0.2:8000"] is None and dropped["10.0.0.3:8000"] is None
    assert result.destination in ("10.0.0.2:8000", "10.0.0.3:8000")
    assert result.details["prefix-cache.prompt_blocks"] > 0
    assert all(e.inflight_requests == 0 for e in director.pool)
    prefix = director.scheduler.scorers[0][0]
    assert prefix.index.stats()["total_entries"] == 0


def test_explain_reports_a_rejection_instead_of_raising() -> None:
    director = make_director(POOL)
    result = director.explain(CHAT, b"{", None)
    assert result.rejection is not None and result.rejection.code == "bad_request"


# -- request headers: current and older names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "priority", "fairness", "target"),
    [
        ({"x-gateway-inference-objective": "batch"}, -1, "default-flow", "m"),
        (
            {"x-llm-d-inference-objective": "batch", "x-gateway-inference-objective": "chat"},
            -1,
            "default-flow",
            "m",
        ),
        ({"x-llm-d-inference-fairness-id": "tenant-a"}, 0, "tenant-a", "m"),
        ({"x-gateway-inference-fairness-id": "tenant-b"}, 0, "tenant-b", "m"),
        ({"x-llm-d-model-name-rewrite": "m-v2"}, 0, "default-flow", "m-v2"),
        ({"x-gateway-model-name-rewrite": "m-v3"}, 0, "default-flow", "m-v3"),
    ],
)
def test_current_and_older_header_names_are_read(headers, priority, fairness, target) -> None:
    director = make_director(
        POOL, objectives=[{"name": "batch", "priority": -1}, {"name": "chat", "priority": 5}]
    )
    request, _, _ = director.prepare({**CHAT, **headers}, body())
    assert (request.priority, request.fairness_id, request.target_model) == (priority, fairness, target)


def test_latency_objectives_are_read_in_milliseconds() -> None:
    director = make_director(POOL)
    request, _, _ = director.prepare({**CHAT, "x-llm-d-slo-ttft-ms": "250", "x-slo-tpot-ms": "20"}, body())
    assert (request.slo_ttft_s, request.slo_tpot_s) == (0.25, 0.02)
    request, _, _ = director.prepare(CHAT, body())
    assert (request.slo_ttft_s, request.slo_tpot_s) == (None, None)


@pytest.mark.parametrize("value", ["fast", "-5", "0", "inf", "nan"])
def test_a_bad_latency_objective_is_a_400_naming_the_header(value: str) -> None:
    director = make_director(POOL)
    with pytest.raises(Rejection) as info:
        director.decide({**CHAT, "x-llm-d-slo-ttft-ms": value}, body())
    assert (info.value.status, info.value.code) == (400, "bad_request")
    assert "x-llm-d-slo-ttft-ms" in info.value.message
