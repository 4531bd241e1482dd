"""Pool saturation and load shedding.

    sat(e)   = max(waiting(e) / queue_threshold, kv_usage(e) / kv_threshold)   (1.0 if metrics are stale)
    sat(pool) = mean over endpoints of sat(e)

Defaults (upstream): queue_threshold 5, kv_threshold 0.8, stale after 0.2 s. A sheddable request
(priority < 0) is refused with 429 while sat(pool) ≥ 1; other requests are always admitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from epp.config import SaturationConfig, ScrapeConfig
from epp.datalayer.endpoints import Endpoint
from epp.errors import Rejection


class SaturationDetector:
    def __init__(
        self,
        config: SaturationConfig,
        scrape: ScrapeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` must be the clock the scraper stamps metrics with (`time.monotonic`)."""
        self.clock = clock
        self.queue_threshold = config.queue_threshold
        self.kv_threshold = config.kv_threshold
        self.min_staleness = config.metrics_staleness_s
        self.scrape = scrape or ScrapeConfig()

    def staleness(self, endpoints: int) -> float:
        """Age beyond which metrics are stale, for a pool of `endpoints`."""
        return max(self.min_staleness, 3 * self.scrape.period(endpoints))

    def endpoint_saturation(self, endpoint: Endpoint, now: float, staleness: float | None = None) -> float:
        m = endpoint.metrics
        if staleness is None:
            staleness = self.min_staleness
        if not endpoint.reachable or m.age(now) > staleness:
            return 1.0
        queue = m.waiting / self.queue_threshold
        kv = m.kv_usage / self.kv_threshold
        return queue if queue > kv else kv

    def saturation(self, endpoints: Sequence[Endpoint], now: float | None = None) -> float:
        if not endpoints:
            return 1.0
        now = self.clock() if now is None else now
        staleness = self.staleness(len(endpoints))
        return sum(self.endpoint_saturation(e, now, staleness) for e in endpoints) / len(endpoints)

    def admit(self, priority: int, endpoints: Sequence[Endpoint], pool_name: str) -> None:
        """Raise Rejection(429) for a sheddable request while the pool is saturated."""
        if priority >= 0:
            return
        level = self.saturation(endpoints)
        if level >= 1.0:
            raise Rejection(
                429,
                "saturated_shed",
                f"pool '{pool_name}' is saturated (saturation {level:.2f} >= 1.0: queues >= "
                f"{self.queue_threshold:g} or KV cache >= {self.kv_threshold:.0%}, or metrics stale); "
                f"sheddable request (priority {priority}) rejected, retry later",
            )
