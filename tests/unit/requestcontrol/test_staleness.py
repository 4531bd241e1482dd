"""Metric staleness follows the scrape period, so big pools scraped less often are not 'saturated'."""

from __future__ import annotations

from epp.config import SaturationConfig, ScrapeConfig
from epp.datalayer.endpoints import Endpoint, MetricsSnapshot
from epp.requestcontrol.admission import SaturationDetector

NOW = 500.0  # the injected clock


def pool(size: int, age: float) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000", metrics=MetricsSnapshot(updated_at=NOW - age)) for i in range(size)]


def test_small_pool_keeps_the_upstream_200ms_rule() -> None:
    detector = SaturationDetector(SaturationConfig(), ScrapeConfig(), clock=lambda: NOW)
    assert detector.staleness(8) == 0.2
    assert detector.saturation(pool(8, 0.1)) == 0.0
    assert detector.saturation(pool(8, 0.3)) == 1.0


def test_large_pool_staleness_is_three_scrape_periods() -> None:
    scrape = ScrapeConfig(max_scrapes_per_second=500)
    detector = SaturationDetector(SaturationConfig(), scrape, clock=lambda: NOW)
    assert scrape.period(256) == 256 / 500
    assert detector.staleness(256) == 3 * 256 / 500
    assert detector.saturation(pool(256, 0.6)) == 0.0  # one period old: fresh for this pool
    assert detector.saturation(pool(256, 2.0)) == 1.0


def test_no_budget_means_the_configured_interval() -> None:
    scrape = ScrapeConfig(max_scrapes_per_second=None)
    assert scrape.period(1000) == scrape.interval_s
