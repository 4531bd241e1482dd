"""Built-in filters: the gateway's subset hint and the healthy filter, alone and inside the scheduler."""

from __future__ import annotations

import pytest

from epp.datastore.endpoints import Endpoint
from epp.errors import Rejection
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.plugins.filters import HealthyFilter, SubsetHintFilter
from epp.scheduling.plugins.scorers import QueueScorer
from epp.scheduling.scheduler import Scheduler


class FirstPicker:
    name = "first"

    def pick(self, request, candidates, totals, count):  # type: ignore[no-untyped-def]
        return list(candidates[:count])


def pool(n: int = 4) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000") for i in range(1, n + 1)]


def request(subset: frozenset[str] | None = None) -> SchedulingRequest:
    return SchedulingRequest("r", "m", "m", subset=subset)


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return [e.address for e in endpoints]


def test_subset_hint_absent_keeps_everyone() -> None:
    candidates = pool()
    assert SubsetHintFilter().filter(request(None), candidates) == candidates


def test_subset_hint_keeps_listed_endpoints_in_pool_order() -> None:
    hint = frozenset({"10.0.0.3:8000", "10.0.0.1:8000", "10.9.9.9:8000"})  # one not in the pool
    kept = SubsetHintFilter().filter(request(hint), pool())
    assert addresses(kept) == ["10.0.0.1:8000", "10.0.0.3:8000"]


def test_subset_hint_empty_list_allows_nothing() -> None:
    assert SubsetHintFilter().filter(request(frozenset()), pool()) == []


def test_subset_hint_with_no_eligible_endpoint_is_503_subset_empty() -> None:
    sched = Scheduler([SubsetHintFilter(), HealthyFilter()], [(QueueScorer(), 1.0)], FirstPicker())
    for hint in (frozenset(), frozenset({"10.9.9.9:8000"})):
        with pytest.raises(Rejection) as info:
            sched.schedule(request(hint), pool())
        assert info.value.status == 503
        assert info.value.code == "subset_empty"
        assert "subset-hint" in info.value.message


def test_subset_hint_restricts_the_scheduler_choice() -> None:
    sched = Scheduler([SubsetHintFilter()], [(QueueScorer(), 1.0)], FirstPicker())
    result = sched.schedule(request(frozenset({"10.0.0.4:8000"})), pool(), count=3)
    assert addresses(result.endpoints) == ["10.0.0.4:8000"]


def test_healthy_drops_unreachable() -> None:
    candidates = pool()
    candidates[1].reachable = False
    candidates[3].reachable = False
    kept = HealthyFilter().filter(request(), candidates)
    assert addresses(kept) == ["10.0.0.1:8000", "10.0.0.3:8000"]


def test_healthy_keeps_all_when_all_unreachable() -> None:
    candidates = pool()
    for e in candidates:
        e.reachable = False
    assert HealthyFilter().filter(request(), candidates) == candidates


def test_healthy_after_subset_only_considers_the_subset() -> None:
    candidates = pool()
    candidates[0].reachable = False  # the only endpoint of the subset is unreachable: kept anyway
    sched = Scheduler([SubsetHintFilter(), HealthyFilter()], [(QueueScorer(), 1.0)], FirstPicker())
    result = sched.schedule(request(frozenset({"10.0.0.1:8000"})), candidates)
    assert addresses(result.endpoints) == ["10.0.0.1:8000"]
