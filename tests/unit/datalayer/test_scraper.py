"""MetricsScraper's timing and bookkeeping on a virtual clock with a fake transport: cadence without
overlap or catch-up, back-off, unreachable and recovery, the scrape budget following the pool, spread start
phases, bad pages. Exact times, no wall clock (tests/support/virtual_time.py). The HTTP transport itself is
tested against real sockets in tests/component/datalayer/."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable

import pytest
from support.virtual_time import run_virtual

from epp.config import ScrapeConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.scrape.scraper import MetricsScraper

VLLM = """\
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 1.0
vllm:kv_cache_usage_perc{model_name="m"} 0.5
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9
"""


class FakeServers:
    """The transport: per address a page, a status, a response delay, or a refused connection. Records
    when (virtual time) each request started and how many ran at once."""

    def __init__(self) -> None:
        self.page: dict[str, str] = {}
        self.status: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.refused: set[str] = set()
        self.arrivals: dict[str, list[float]] = {}
        self.active = 0
        self.max_active = 0
        self.timeout = 1.0  # the transport's deadline, as KeepAliveGet enforces it

    def add(self, address: str, page: str = VLLM) -> Endpoint:
        self.page[address] = page
        return Endpoint(address)

    async def __call__(self, endpoint: Endpoint) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        self.arrivals.setdefault(endpoint.address, []).append(loop.time())
        if endpoint.address in self.refused:
            raise ConnectionRefusedError("connection refused")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            delay = self.delay.get(endpoint.address, 0.0)
            if delay > self.timeout:
                await asyncio.sleep(self.timeout)
                raise TimeoutError
            await asyncio.sleep(delay)
            return self.status.get(endpoint.address, 200), self.page[endpoint.address].encode()
        finally:
            self.active -= 1


def scraper_for(pool: EndpointPool, servers: FakeServers, **config: object) -> MetricsScraper:
    loop = asyncio.get_running_loop()
    servers.timeout = float(config.get("timeout_s", 1.0))  # type: ignore[arg-type]
    return MetricsScraper(
        pool,
        ScrapeConfig(**config),
        fetch=servers,
        clock=loop.time,
        rng=random.Random(0),  # type: ignore[arg-type]
    )


class Scrapes:
    """Every scrape attempt via the scraper's listener; a test awaits the n-th one."""

    def __init__(self, scraper: MetricsScraper) -> None:
        self.results: dict[str, list[bool]] = {}
        self.backoffs: dict[str, list[float]] = {}
        self._scraper = scraper
        self._changed = asyncio.Event()
        scraper.on_scrape(self._record)

    def _record(self, endpoint: Endpoint, ok: bool) -> None:
        self.results.setdefault(endpoint.address, []).append(ok)
        self.backoffs.setdefault(endpoint.address, []).append(self._scraper.stats[endpoint.address].backoff)
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    async def count(self, address: str, n: int, ok: bool | None = None) -> None:
        await self.until(lambda: len([r for r in self.results.get(address, []) if ok in (None, r)]) >= n)


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 9) for a, b in itertools.pairwise(times)]


def test_scrape_once_stamps_the_snapshot_with_the_scrape_clock() -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000")
        scraper = scraper_for(EndpointPool([endpoint]), servers)
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(7.5)
        assert await scraper.scrape_once(endpoint)
        m = endpoint.metrics
        assert (m.waiting, m.running, m.kv_usage, m.running_loras, m.max_lora) == (1.0, 3.0, 0.5, {"sql"}, 2)
        assert m.updated_at == started + 7.5
        assert scraper.stats[endpoint.address].ok == 1

    run_virtual(main())


def test_healthy_endpoint_is_scraped_every_interval_from_the_start_of_the_last_scrape() -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000")
        servers.delay[endpoint.address] = 0.004  # the scrape's own duration does not shift the cadence
        scraper = scraper_for(EndpointPool([endpoint]), servers, interval_s=0.01)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 6, ok=True)
        await scraper.stop()
        assert gaps(servers.arrivals[endpoint.address]) == pytest.approx([0.01] * 5)
        assert scraper.stats[endpoint.address].failed == 0

    run_virtual(main())


def test_slow_server_is_never_scraped_concurrently_and_missed_periods_are_not_caught_up() -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000")
        servers.delay[endpoint.address] = 0.05  # each response takes 5 intervals
        scraper = scraper_for(EndpointPool([endpoint]), servers, interval_s=0.01)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 4, ok=True)
        await scraper.stop()
        assert servers.max_active == 1
        # Back to back, every 0.05 s: the next one waited for the previous one; no burst of missed ones.
        assert gaps(servers.arrivals[endpoint.address]) == pytest.approx([0.05] * 3)

    run_virtual(main())


def test_timeout_fails_the_scrape_without_pile_up() -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000")
        servers.delay[endpoint.address] = 30.0
        scraper = scraper_for(
            EndpointPool([endpoint]), servers, interval_s=0.01, timeout_s=0.05, unreachable_after=2
        )
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 3, ok=False)
        assert not endpoint.reachable
        await scraper.stop()
        assert servers.max_active == 1
        stats = scraper.stats[endpoint.address]
        assert stats.last_error == "timeout after 0.05 s"
        assert stats.consecutive_failures >= 3

    run_virtual(main())


def test_dead_endpoint_backs_off_doubling_capped_then_recovers() -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000")
        servers.refused.add(endpoint.address)
        scraper = scraper_for(
            EndpointPool([endpoint]), servers, interval_s=0.01, max_backoff_s=0.08, unreachable_after=3
        )
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 2, ok=False)
        assert endpoint.reachable  # not yet: 3 failures needed
        await scrapes.count(endpoint.address, 5, ok=False)
        assert not endpoint.reachable
        assert scrapes.backoffs[endpoint.address][:5] == [0.02, 0.04, 0.08, 0.08, 0.08]  # doubles, capped
        # And the attempts really are that far apart.
        assert gaps(servers.arrivals[endpoint.address][:5]) == pytest.approx([0.02, 0.04, 0.08, 0.08])
        assert "ConnectionRefusedError" in scraper.stats[endpoint.address].last_error

        servers.refused.clear()
        await scrapes.count(endpoint.address, 1, ok=True)
        assert endpoint.reachable
        assert endpoint.metrics.updated_at == asyncio.get_running_loop().time()
        stats = scraper.stats[endpoint.address]
        assert stats.consecutive_failures == 0 and stats.backoff == 0.0
        await scraper.stop()

    run_virtual(main())


def test_backoff_schedule_with_defaults() -> None:
    scraper = MetricsScraper(EndpointPool())
    assert [scraper.backoff(k) for k in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert scraper.backoff(10_000) == 2.0


def test_page_without_required_metrics_fails_but_stays_reachable_without_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000", "<html>hello</html>")
        scraper = scraper_for(EndpointPool([endpoint]), servers, interval_s=0.01)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 6, ok=False)
        await scraper.stop()
        assert endpoint.metrics.updated_at == 0.0  # never replaced: readers see it as stale
        assert endpoint.reachable
        stats = scraper.stats[endpoint.address]
        assert stats.ok == 0 and stats.failed >= 6 and stats.backoff == 0.0
        assert "missing vllm:num_requests_waiting" in stats.last_error
        every = gaps(servers.arrivals[endpoint.address])
        assert every == pytest.approx([0.01] * len(every))  # a bad page does not back off

    with caplog.at_level(logging.WARNING, logger="epp.datalayer.scrape.scraper"):
        run_virtual(main())
    assert len([r for r in caplog.records if "missing" in r.getMessage()]) == 3  # one per missing metric


def test_malformed_page_is_logged_once_per_problem(caplog: pytest.LogCaptureFixture) -> None:
    page = (
        VLLM
        + 'vllm:cache_config_info{block_size="16" 1\n'  # unparsable
        + 'vllm:num_requests_waiting{model_name="n"} NaN\n'  # non-finite
    )

    async def main() -> Endpoint:
        servers = FakeServers()
        endpoint = servers.add("10.0.0.1:8000", page)
        scraper = scraper_for(EndpointPool([endpoint]), servers, interval_s=0.01)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(endpoint.address, 8, ok=True)  # usable despite the problems
        await scraper.stop()
        return endpoint

    with caplog.at_level(logging.WARNING, logger="epp.datalayer.scrape.scraper"):
        endpoint = run_virtual(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(endpoint.address in message for message in warnings)
    assert any("unparsable vllm:cache_config_info" in m for m in warnings)
    assert any("non-finite vllm:num_requests_waiting" in m for m in warnings)
    assert endpoint.metrics.waiting == 1.0 and endpoint.reachable


def test_pool_changes_start_and_cancel_loops() -> None:
    async def main() -> None:
        servers = FakeServers()
        one, two, three = (servers.add(f"10.0.0.{i}:8000") for i in (1, 2, 3))
        pool = EndpointPool([one, two])
        scraper = scraper_for(pool, servers, interval_s=0.01)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(one.address, 2, ok=True)
        await scrapes.count(two.address, 2, ok=True)

        pool.replace([Endpoint(two.address), Endpoint(three.address)])
        scrapes_of_one = len(servers.arrivals[one.address])
        await scrapes.count(three.address, 3, ok=True)
        await scrapes.count(two.address, len(scrapes.results[two.address]) + 3, ok=True)
        assert len(servers.arrivals[one.address]) == scrapes_of_one  # its loop was cancelled
        assert set(scraper.stats) == {two.address, three.address}
        assert pool.get(two.address).metrics.updated_at > 0  # type: ignore[union-attr]

        pool.replace([])
        assert scraper.stats == {}
        await scraper.stop()
        # After stop, pool changes start nothing.
        pool.replace([Endpoint(one.address)])
        assert scraper._tasks == {}

    run_virtual(main())


def test_period_stretches_with_the_pool_to_bound_the_scrape_rate() -> None:
    def pool(n: int) -> EndpointPool:
        return EndpointPool([Endpoint(f"10.0.0.{i // 250}:{8000 + i}") for i in range(n)])

    assert MetricsScraper(pool(20)).period() == 0.05  # 400/s: under the default budget of 500/s
    assert MetricsScraper(pool(64)).period() == 0.128  # 64 / 500
    assert MetricsScraper(pool(256)).period() == 0.512  # 256 / 500
    assert MetricsScraper(pool(256), ScrapeConfig(max_scrapes_per_second=None)).period() == 0.05
    assert MetricsScraper(pool(10), ScrapeConfig(interval_s=0.01, max_scrapes_per_second=100)).period() == 0.1


def test_scrape_budget_stretches_the_period_and_follows_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        servers = FakeServers()
        fleet = [servers.add(f"10.0.0.{i}:8000") for i in range(4)]
        pool = EndpointPool(fleet)
        scraper = scraper_for(pool, servers, interval_s=0.01, max_scrapes_per_second=40)
        scrapes = Scrapes(scraper)
        await scraper.start()
        await scrapes.count(fleet[0].address, 4)
        for endpoint in fleet:  # 4 endpoints at 40/s: each every 0.1 s, not every 0.01 s
            assert set(gaps(servers.arrivals[endpoint.address])) <= {0.1}
        pool.replace([Endpoint(fleet[0].address)])  # one endpoint left: every 1/40 s
        done = len(servers.arrivals[fleet[0].address])
        await scrapes.count(fleet[0].address, done + 6)
        await scraper.stop()
        after = gaps(servers.arrivals[fleet[0].address][done:])
        assert after == pytest.approx([0.025] * len(after))

    caplog.set_level(logging.INFO, logger="epp.datalayer.scrape.scraper")
    run_virtual(main())
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert logged == [
        "scraping 4 endpoints every 0.1 s (interval 0.01 s, at most 40 scrapes/s)",
        "scraping 1 endpoints every 0.025 s (interval 0.01 s, at most 40 scrapes/s)",
    ]


def test_loops_start_spread_over_the_first_period() -> None:
    async def main() -> list[float]:
        servers = FakeServers()
        fleet = [servers.add(f"10.0.0.{i}:8000") for i in range(8)]
        scraper = scraper_for(EndpointPool(fleet), servers, interval_s=0.2)
        scrapes = Scrapes(scraper)
        start = asyncio.get_running_loop().time()
        await scraper.start()
        for endpoint in fleet:
            await scrapes.count(endpoint.address, 1)
        await scraper.stop()
        return sorted(servers.arrivals[e.address][0] - start for e in fleet)

    firsts = run_virtual(main())
    assert all(0.0 <= t < 0.2 for t in firsts)  # each within its first period
    assert len(set(firsts)) == len(firsts)  # one phase each, not one burst
    assert firsts[-1] - firsts[0] > 0.1  # spread over the period (seeded rng)


def test_scrape_all_reports_successes_and_failures() -> None:
    async def main() -> None:
        servers = FakeServers()
        good, bad = servers.add("10.0.0.1:8000"), servers.add("10.0.0.2:8000")
        servers.status[bad.address] = 500
        scraper = scraper_for(EndpointPool([good, bad]), servers)
        assert await scraper.scrape_all() == 1
        await scraper.stop()
        assert good.metrics.updated_at == asyncio.get_running_loop().time()
        assert bad.metrics.age() == float("inf")
        assert scraper.stats[bad.address].last_error == "HTTP 500"

    run_virtual(main())
