"""Built-in filters: the healthy filter. (The gateway's subset hint is applied by the director:
tests/unit/requestcontrol/test_director.py.)"""

from __future__ import annotations

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.filters.healthy import HealthyFilter


def pool(n: int = 4) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000") for i in range(1, n + 1)]


def request() -> SchedulingRequest:
    return SchedulingRequest("r", "m", "m")


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return [e.address for e in endpoints]


def test_healthy_drops_unreachable() -> None:
    candidates = pool()
    candidates[1].reachable = False
    candidates[3].reachable = False
    kept = HealthyFilter().filter(request(), CycleState(), candidates)
    assert addresses(kept) == ["10.0.0.1:8000", "10.0.0.3:8000"]


def test_healthy_keeps_none_when_all_unreachable() -> None:
    """The scheduler turns the empty list into 503 no_endpoints naming the filter."""
    candidates = pool()
    for e in candidates:
        e.reachable = False
    assert HealthyFilter().filter(request(), CycleState(), candidates) == []


def test_healthy_keeps_all_when_all_unreachable_if_configured() -> None:
    candidates = pool()
    for e in candidates:
        e.reachable = False
    assert HealthyFilter(keep_all_if_none=True).filter(request(), CycleState(), candidates) == candidates
