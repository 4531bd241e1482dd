"""Bands and flows: FCFS within a flow, fair order between flows (round-robin or token-weighted), removal
from anywhere, and no memory kept for flows that emptied. No clock, no event loop."""

from __future__ import annotations

import pytest

from epp.flowcontrol.queues import Band, QueuedRequest
from epp.scheduling.interfaces import SchedulingRequest


def item(tenant: str, n: int, *, cost: int = 1, size: int = 100) -> QueuedRequest:
    request = SchedulingRequest(f"{tenant}-{n}", "m", "m", fairness_id=tenant)
    return QueuedRequest(request, None, size, cost, 0.0, 30.0, None)


def drain(band: Band, limit: int = 1000) -> list[str]:
    """Serve the band to empty, in its fair order."""
    out = []
    for _ in range(limit):
        flow = band.pop_flow()
        if flow is None:
            break
        out.append(band.served(flow).request.request_id)
    return out


def test_one_flow_is_first_come_first_served() -> None:
    band = Band(0)
    for n in range(4):
        band.add(item("a", n))
    assert drain(band) == ["a-0", "a-1", "a-2", "a-3"]


def test_round_robin_alternates_flows_whatever_their_backlog() -> None:
    band = Band(0)
    for n in range(6):
        band.add(item("heavy", n))
    for n in range(2):
        band.add(item("light", n))
    assert drain(band) == [
        "heavy-0", "light-0", "heavy-1", "light-1", "heavy-2", "heavy-3", "heavy-4", "heavy-5"
    ]  # fmt: skip


def test_a_flow_arriving_late_goes_next_not_behind_the_backlog() -> None:
    band = Band(0)
    for n in range(10):
        band.add(item("heavy", n))
    served = drain(band, limit=5)  # the heavy flow alone for a while
    band.add(item("light", 0))
    served += drain(band, limit=2)
    assert served[-2:] == ["light-0", "heavy-5"]


def test_idle_time_earns_no_credit() -> None:
    band = Band(0)
    band.add(item("a", 0))
    drain(band)
    for n in range(1, 4):
        band.add(item("a", n))
    for n in range(3):
        band.add(item("b", n))
    # b was never served but starts at the band's virtual time, not ahead of a by a's past service.
    assert drain(band) == ["a-1", "b-0", "a-2", "b-1", "a-3", "b-2"]


def test_token_weighted_fairness_gives_equal_tokens_not_equal_requests() -> None:
    band = Band(0)
    for n in range(8):
        band.add(item("long", n, cost=4000))  # long prompts
    for n in range(8):
        band.add(item("short", n, cost=1000))
    first_ten = drain(band, limit=10)
    tokens = {"long": 0, "short": 0}
    for request_id in first_ten:
        tenant = request_id.split("-")[0]
        tokens[tenant] += 4000 if tenant == "long" else 1000
    assert first_ten.count("short-0") == 1 and sum(r.startswith("short") for r in first_ten) == 8
    # Within one request's cost of each other.
    assert abs(tokens["long"] - tokens["short"]) <= 4000, tokens


def test_remove_from_the_middle_keeps_order_and_totals() -> None:
    band = Band(0)
    items = [item("a", n, size=10 * (n + 1)) for n in range(4)]
    for i in items:
        band.add(i)
    band.remove(items[2])
    assert (band.count, band.bytes) == (3, 10 + 20 + 40)
    assert items[2].flow is None
    assert drain(band) == ["a-0", "a-1", "a-3"]
    assert (band.count, band.bytes, band.flows) == (0, 0, {})


def test_a_flow_that_empties_is_forgotten_and_its_heap_entry_ignored() -> None:
    band = Band(0)
    only = item("gone", 0)
    band.add(only)
    band.add(item("stays", 0))
    band.remove(only)
    assert list(band.flows) == ["stays"]
    assert drain(band) == ["stays-0"]
    assert band.pop_flow() is None


def test_a_flow_put_back_keeps_its_place() -> None:
    band = Band(0)
    band.add(item("a", 0))
    band.add(item("b", 0))
    flow = band.pop_flow()
    assert flow is not None and flow.fairness_id == "a"
    band.put_back(flow)  # could not be dispatched (its endpoints were full): same tag
    assert drain(band) == ["a-0", "b-0"]


@pytest.mark.parametrize("flows", [1, 3, 50])
def test_the_heap_stays_bounded_under_churn(flows: int) -> None:
    band = Band(0)
    for round_ in range(200):
        batch = [item(f"t{f}", round_) for f in range(flows)]
        for i in batch:
            band.add(i)
        for i in batch[::2]:
            band.remove(i)
        drain(band)
    assert band.count == 0 and band.flows == {}
    assert len(band._heap) <= 4 * flows + 64 + 1
