"""The saturation gate: the detector's formula plus the picker's own traffic since each endpoint's last
scrape (a burst is seen before the scrape shows it). Injected clock: no test reads the real one."""

from __future__ import annotations

import pytest

from epp.config import SaturationConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.flowcontrol.gate import CapacityGate, SaturationGate
from epp.requestcontrol.admission import SaturationDetector
from epp.scheduling.interfaces import SchedulingRequest

NOW = 1000.0


def endpoint(i: int, *, waiting: float = 0, kv: float = 0.0, age: float = 0.0, **shape: int) -> Endpoint:
    metrics = MetricsSnapshot(waiting=waiting, kv_usage=kv, updated_at=NOW - age, **shape)
    return Endpoint(f"10.0.0.{i}:8000", metrics=metrics)


def gate_over(endpoints: list[Endpoint]) -> SaturationGate:
    detector = SaturationDetector(SaturationConfig(), clock=lambda: NOW)
    return SaturationGate(detector, EndpointPool(endpoints))


def request(prompt_tokens: int = 100) -> SchedulingRequest:
    return SchedulingRequest("r", "m", "m", prompt_tokens=prompt_tokens)


def rescrape(e: Endpoint, **values: float) -> None:
    """A new scrape of `e` (a new stamp), as the scraper writes it."""
    old = e.metrics
    e.metrics = MetricsSnapshot(
        waiting=values.get("waiting", old.waiting), kv_usage=values.get("kv", old.kv_usage),
        num_blocks=old.num_blocks, block_size=old.block_size, updated_at=old.updated_at + 0.05,
    )  # fmt: skip


def test_it_is_a_capacity_gate() -> None:
    assert isinstance(gate_over([endpoint(1)]), CapacityGate)


def test_without_own_traffic_it_is_the_detectors_formula() -> None:
    endpoints = [endpoint(1, waiting=5), endpoint(2, kv=0.4), endpoint(3), endpoint(4, age=10)]
    gate = gate_over(endpoints)
    assert gate.saturation(request(), endpoints) == pytest.approx((1.0 + 0.5 + 0.0 + 1.0) / 4)
    assert gate.saturation(None, endpoints) == gate.detector.saturation(endpoints)


def test_never_scraped_or_unreachable_counts_as_saturated() -> None:
    never = Endpoint("10.0.0.9:8000")
    down = endpoint(2)
    down.reachable = False
    assert gate_over([never, down]).saturation(request(), [never, down]) == 1.0


def test_dispatches_since_the_scrape_count_as_waiting() -> None:
    e = endpoint(1, waiting=2)
    gate = gate_over([e])
    for _ in range(3):
        gate.dispatched(e, request())
    assert gate.saturation(request(), [e]) == pytest.approx((2 + 3) / 5)


def test_a_new_scrape_restarts_the_count() -> None:
    e = endpoint(1, waiting=2)
    gate = gate_over([e])
    for _ in range(3):
        gate.dispatched(e, request())
    rescrape(e, waiting=4)  # the scrape now shows them (in its own numbers)
    assert gate.saturation(request(), [e]) == pytest.approx(4 / 5)
    gate.dispatched(e, request())
    assert gate.saturation(request(), [e]) == pytest.approx(5 / 5)


def test_first_bytes_take_requests_back_out_but_never_below_the_scrape() -> None:
    e = endpoint(1, waiting=1)
    gate = gate_over([e])
    gate.dispatched(e, request())
    gate.dispatched(e, request())
    gate.started(e)
    assert gate.saturation(request(), [e]) == pytest.approx((1 + 1) / 5)
    gate.started(e)
    gate.started(e)  # one from before the scrape: already in its numbers
    assert gate.saturation(request(), [e]) == pytest.approx(1 / 5)


def test_requests_not_started_count_until_their_first_byte_even_after_a_scrape() -> None:
    e = endpoint(1)
    gate = gate_over([e])
    for _ in range(3):
        gate.dispatched(e, request())
    rescrape(e, waiting=1)  # the engine shows one waiting: the other two are in prefill ("running")
    assert gate.saturation(request(), [e]) == pytest.approx(3 / 5)
    gate.started(e)
    gate.started(e)
    assert gate.saturation(request(), [e]) == pytest.approx(1 / 5)  # the scrape's own number


def test_dispatched_prompt_tokens_add_to_kv_when_the_cache_shape_is_known() -> None:
    e = endpoint(1, kv=0.5, num_blocks=1000, block_size=16)  # 16,000 tokens
    shapeless = endpoint(2, kv=0.5)
    gate = gate_over([e, shapeless])
    gate.dispatched(e, request(prompt_tokens=3200))  # +0.2 of the cache
    gate.dispatched(shapeless, request(prompt_tokens=3200))
    assert gate.saturation(request(), [e]) == pytest.approx((0.5 + 0.2) / 0.8)
    assert gate.saturation(request(), [shapeless]) == pytest.approx(max(0.5 / 0.8, 1 / 5))


def test_a_burst_closes_the_gate_before_any_scrape_shows_it() -> None:
    endpoints = [endpoint(i) for i in range(4)]
    gate = gate_over(endpoints)
    sent = 0
    while gate.saturation(request(), endpoints) < 1.0:
        gate.dispatched(endpoints[sent % 4], request())
        sent += 1
    assert sent == 4 * 5  # queue_threshold 5 per endpoint


def test_removed_endpoints_are_forgotten() -> None:
    a, b = endpoint(1), endpoint(2)
    pool = EndpointPool([a, b])
    gate = SaturationGate(SaturationDetector(SaturationConfig(), clock=lambda: NOW), pool)
    gate.dispatched(a, request())
    pool.replace([b])
    assert a not in gate._sent


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def cached_gate(endpoints: list[Endpoint]) -> tuple[SaturationGate, EndpointPool, Clock]:
    clock = Clock()
    pool = EndpointPool(endpoints)
    return SaturationGate(SaturationDetector(SaturationConfig(), clock=clock), pool), pool, clock


def test_the_pools_terms_are_kept_between_requests_and_rescanned_after_a_few_ms() -> None:
    e = endpoint(1, waiting=1)
    gate, pool, clock = cached_gate([e])
    assert gate.saturation(request(), pool.all()) == pytest.approx(1 / 5)
    e.metrics = MetricsSnapshot(waiting=3, updated_at=NOW)  # a scrape the kept terms have not seen yet
    clock.now += SaturationGate.RESCAN_S / 2
    assert gate.saturation(request(), pool.all()) == pytest.approx(1 / 5)
    clock.now += SaturationGate.RESCAN_S
    assert gate.saturation(request(), pool.all()) == pytest.approx(3 / 5)


def test_own_dispatches_and_first_bytes_update_the_kept_terms_at_once() -> None:
    a, b = endpoint(1, waiting=1), endpoint(2)
    gate, pool, _ = cached_gate([a, b])
    assert gate.saturation(request(), pool.all()) == pytest.approx(0.1)
    gate.dispatched(a, request())
    gate.dispatched(a, request())
    assert gate.saturation(request(), pool.all()) == pytest.approx((3 / 5) / 2)
    gate.started(a)
    assert gate.saturation(request(), pool.all()) == pytest.approx((2 / 5) / 2)


def test_a_saturated_verdict_is_always_taken_on_fresh_terms() -> None:
    e = endpoint(1, waiting=4)
    gate, pool, _ = cached_gate([e])
    gate.saturation(request(), pool.all())
    gate.dispatched(e, request())  # the kept terms now say saturated (5 / 5)...
    e.metrics = MetricsSnapshot(waiting=0, updated_at=NOW + 0.001)  # ...but a scrape shows room
    assert gate.saturation(request(), pool.all()) == pytest.approx(1 / 5)  # (ours, not started yet)


def test_refresh_forces_a_fresh_pass() -> None:
    e = endpoint(1)
    gate, pool, _ = cached_gate([e])
    gate.saturation(request(), pool.all())
    e.metrics = MetricsSnapshot(waiting=10, updated_at=NOW)
    gate.refresh()
    assert gate.saturation(request(), pool.all()) == pytest.approx(2.0)


def test_a_subset_is_computed_afresh_every_time() -> None:
    a, b = endpoint(1, waiting=5), endpoint(2)
    gate, pool, _ = cached_gate([a, b])
    gate.saturation(request(), pool.all())
    b.metrics = MetricsSnapshot(waiting=5, updated_at=NOW)
    assert gate.saturation(request(), [b]) == pytest.approx(1.0)
