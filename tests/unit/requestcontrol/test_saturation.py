"""Saturation detection and load shedding: formula, staleness, who gets shed and what they are told."""

from __future__ import annotations

import random

import orjson
import pytest

from epp.config import SaturationConfig, load_config
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.errors import Rejection
from epp.requestcontrol.admission import SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.registry import PluginContext, build_scheduler

NOW = 1000.0  # the injected clock: no test here reads the real one


def clock() -> float:
    return NOW


def endpoint(index: int, *, waiting: float = 0, kv: float = 0.0, age: float = 0.0) -> Endpoint:
    return Endpoint(
        f"10.0.0.{index}:8000", metrics=MetricsSnapshot(waiting=waiting, kv_usage=kv, updated_at=NOW - age)
    )


def fresh(index: int, *, waiting: float = 0, kv: float = 0.0) -> Endpoint:
    """Scraped just now (by the injected clock)."""
    return endpoint(index, waiting=waiting, kv=kv)


PATIENT = SaturationConfig(metrics_staleness_s=60.0)


# -- formula --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "kv", "expected"),
    [
        (0, 0.0, 0.0),
        (2.5, 0.2, 0.5),  # queue term wins: 2.5 / 5
        (1, 0.6, 0.75),  # kv term wins: 0.6 / 0.8
        (5, 0.0, 1.0),
        (0, 0.8, 1.0),
        (20, 0.4, 4.0),  # not capped
    ],
)
def test_endpoint_saturation_is_max_of_queue_and_kv_terms(waiting: float, kv: float, expected: float) -> None:
    detector = SaturationDetector(SaturationConfig())
    assert detector.endpoint_saturation(endpoint(1, waiting=waiting, kv=kv), NOW) == pytest.approx(expected)


def test_pool_saturation_is_the_mean() -> None:
    detector = SaturationDetector(SaturationConfig())
    endpoints = [endpoint(1, waiting=5), endpoint(2, kv=0.4), endpoint(3)]  # 1.0, 0.5, 0.0
    assert detector.saturation(endpoints, NOW) == pytest.approx(0.5)


def test_thresholds_come_from_the_config() -> None:
    detector = SaturationDetector(SaturationConfig(queue_threshold=10, kv_threshold=0.5))
    assert detector.endpoint_saturation(endpoint(1, waiting=5, kv=0.2), NOW) == pytest.approx(0.5)
    assert detector.endpoint_saturation(endpoint(1, waiting=1, kv=0.4), NOW) == pytest.approx(0.8)


def test_stale_metrics_count_as_saturated() -> None:
    detector = SaturationDetector(SaturationConfig())  # stale after 0.2 s
    assert detector.endpoint_saturation(endpoint(1, age=0.19), NOW) == 0.0
    assert detector.endpoint_saturation(endpoint(1, age=0.21), NOW) == 1.0
    assert detector.endpoint_saturation(endpoint(1, waiting=50, age=0.21), NOW) == 1.0  # not more than 1


def test_never_scraped_and_unreachable_count_as_saturated() -> None:
    detector = SaturationDetector(SaturationConfig())
    assert detector.endpoint_saturation(Endpoint("10.0.0.1:8000"), NOW) == 1.0
    down = endpoint(2)
    down.reachable = False
    assert detector.endpoint_saturation(down, NOW) == 1.0


def test_one_stale_replica_raises_the_pool_mean() -> None:
    detector = SaturationDetector(SaturationConfig())
    endpoints = [endpoint(1, waiting=4), endpoint(2, age=5.0)]  # 0.8 and stale 1.0
    assert detector.saturation(endpoints, NOW) == pytest.approx(0.9)


def test_empty_pool_is_saturated() -> None:
    assert SaturationDetector(SaturationConfig()).saturation([], NOW) == 1.0


# -- admission --------------------------------------------------------------------------------------------


def test_sheddable_request_is_429_while_saturated() -> None:
    detector = SaturationDetector(PATIENT, clock=clock)
    saturated = [fresh(1, waiting=6), fresh(2, kv=0.85)]
    with pytest.raises(Rejection) as info:
        detector.admit(-1, saturated, "pool-a")
    rejection = info.value
    assert rejection.status == 429
    assert rejection.code == "saturated_shed"
    assert "saturated" in rejection.message
    assert "pool-a" in rejection.message
    assert "priority -1" in rejection.message
    error = orjson.loads(rejection.body())["error"]
    assert error["code"] == "saturated_shed"
    assert error["type"] == "rate_limit_error"
    assert "saturated" in error["message"]


def test_saturation_exactly_one_sheds() -> None:
    with pytest.raises(Rejection):
        SaturationDetector(PATIENT, clock=clock).admit(-1, [fresh(1, waiting=5)], "p")


def test_sheddable_request_is_admitted_while_not_saturated() -> None:
    detector = SaturationDetector(PATIENT, clock=clock)
    detector.admit(-1, [fresh(1, waiting=4), fresh(2, kv=0.5)], "p")  # mean (0.8 + 0.625) / 2 < 1
    detector.admit(-5, [fresh(1), fresh(2)], "p")


def test_saturated_only_on_average_one_hot_replica_is_not_enough() -> None:
    detector = SaturationDetector(PATIENT, clock=clock)
    detector.admit(-1, [fresh(1, waiting=8), fresh(2), fresh(3)], "p")  # (1.6 + 0 + 0) / 3


@pytest.mark.parametrize("priority", [0, 1, 100])
def test_priority_zero_or_more_is_never_shed(priority: int) -> None:
    detector = SaturationDetector(PATIENT, clock=clock)
    detector.admit(priority, [fresh(1, waiting=500, kv=1.0)], "p")
    detector.admit(priority, [], "p")
    detector.admit(priority, [Endpoint("10.0.0.9:8000")], "p")  # never scraped


def test_stale_metrics_shed_sheddable_requests() -> None:
    detector = SaturationDetector(SaturationConfig(metrics_staleness_s=0.2), clock=clock)
    idle_but_stale = Endpoint("10.0.0.1:8000", metrics=MetricsSnapshot(updated_at=NOW - 10.0))
    with pytest.raises(Rejection) as info:
        detector.admit(-1, [idle_but_stale], "p")
    assert info.value.code == "saturated_shed"
    assert "stale" in info.value.message


# -- through the director: objective header → priority → shed or schedule -----------------------------------


def pipeline(endpoints: list[Endpoint], **overrides: object) -> Director:
    config = load_config(
        None,
        {
            "objectives": [{"name": "batch", "priority": -1}, {"name": "interactive", "priority": 10}],
            "scheduling": {"seed": 1, "saturation": {"metrics_staleness_s": 60.0}},
            **overrides,
        },
    )
    pool = EndpointPool(endpoints)
    scheduler = build_scheduler(PluginContext(config, pool, random.Random(1)))
    return Director(config, pool, scheduler, clock=clock)


BODY = orjson.dumps({"model": "m", "prompt": "hello"})


def headers(objective: str | None = None) -> dict[str, str]:
    h = {":path": "/v1/completions", "x-request-id": "req-1"}
    if objective:
        h["x-gateway-inference-objective"] = objective
    return h


def test_pipeline_sheds_only_the_sheddable_objective() -> None:
    pipe = pipeline([fresh(1, waiting=10), fresh(2, kv=0.95)])
    with pytest.raises(Rejection) as info:
        pipe.decide(headers("batch"), BODY)
    assert (info.value.status, info.value.code) == (429, "saturated_shed")
    for objective in (None, "interactive", "unknown-objective"):
        decision = pipe.decide(headers(objective), BODY)
        assert decision.destination in ("10.0.0.1:8000", "10.0.0.2:8000")
        pipe.finished(decision, 200)


def test_pipeline_admits_sheddable_when_pool_has_room() -> None:
    pipe = pipeline([fresh(1, waiting=1), fresh(2, kv=0.1)])
    decision = pipe.decide(headers("batch"), BODY)
    assert decision.destination in ("10.0.0.1:8000", "10.0.0.2:8000")
    pipe.finished(decision, 200)


def test_pipeline_negative_default_priority_makes_everything_sheddable() -> None:
    pipe = pipeline([fresh(1, waiting=10)], default_priority=-1)
    with pytest.raises(Rejection):
        pipe.decide(headers(), BODY)
    pipe.decide(headers("interactive"), BODY)


def test_saturated_429_is_distinct_from_no_endpoints_503() -> None:
    pipe = pipeline([fresh(1, waiting=10)])
    with pytest.raises(Rejection) as shed:
        pipe.decide(headers("batch"), BODY)
    with pytest.raises(Rejection) as subset:
        pipe.decide(headers(), BODY, subset=frozenset({"10.9.9.9:1"}))
    with pytest.raises(Rejection) as empty:
        pipeline([]).decide(headers(), BODY)
    assert (shed.value.status, shed.value.code) == (429, "saturated_shed")
    assert (subset.value.status, subset.value.code) == (503, "subset_empty")
    assert (empty.value.status, empty.value.code) == (503, "no_endpoints")
    for unavailable in (subset.value, empty.value):
        assert "saturated" not in unavailable.message
        assert unavailable.error_type == "service_unavailable"


def test_saturation_is_judged_over_the_subset_the_request_may_use() -> None:
    # Pool mean 0.5, but the request may only go to the saturated endpoint (2.0): the idle rest of the
    # pool cannot absorb it.
    pipe = pipeline([fresh(1, waiting=10), fresh(2), fresh(3), fresh(4)])
    with pytest.raises(Rejection) as info:
        pipe.decide(headers("batch"), BODY, subset=frozenset({"10.0.0.1:8000"}))
    assert info.value.code == "saturated_shed"
    # Conversely an idle subset admits sheddable work while the rest of the pool is saturated.
    busy_elsewhere = pipeline([fresh(1), fresh(2, waiting=10), fresh(3, waiting=10)])
    decision = busy_elsewhere.decide(headers("batch"), BODY, subset=frozenset({"10.0.0.1:8000"}))
    assert decision.destination == "10.0.0.1:8000"


def test_empty_pool_is_503_for_sheddable_requests_too() -> None:
    with pytest.raises(Rejection) as info:
        pipeline([]).decide(headers("batch"), BODY)
    assert (info.value.status, info.value.code) == (503, "no_endpoints")
