"""MetricsScraper against real local HTTP servers (aiohttp, 127.0.0.1, ephemeral ports)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from epp.datastore.endpoints import Endpoint, EndpointPool
from epp.datastore.scraper import MetricsScraper

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 3.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 4.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 3.5
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9
"""
PAGES = {
    "vllm": (VLLM, (1.0, 3.0, 0.5)),
    "sglang": (
        "sglang:num_queue_reqs 2\nsglang:num_running_reqs 5\nsglang:token_usage 0.25\n",
        (2.0, 5.0, 0.25),
    ),
    "trtllm-serve": (
        "trtllm_num_requests_waiting 4\ntrtllm_num_requests_running 6\ntrtllm_kv_cache_utilization 0.75\n",
        (4.0, 6.0, 0.75),
    ),
    "triton-trtllm": (
        'nv_trt_llm_request_metrics{request_type="waiting"} 7\n'
        'nv_trt_llm_request_metrics{request_type="scheduled"} 8\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"} 0.125\n',
        (7.0, 8.0, 0.125),
    ),
}


class FakeServer:
    """A model server's /metrics: counts requests, how many run at once, and when each arrived."""

    def __init__(self, body: str = VLLM, delay: float = 0.0, status: int = 200) -> None:
        self.body, self.delay, self.status = body, delay, status
        self.hits = 0
        self.active = 0
        self.max_active = 0
        self.arrivals: list[float] = []
        self.port = 0
        self._hit_waiters: list[tuple[int, asyncio.Event]] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.arrivals.append(time.monotonic())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        for target, event in self._hit_waiters:
            if self.hits >= target:
                event.set()
        try:
            if self.delay:  # a slow server; ends early when the client hangs up (handler cancellation)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), self.delay)
            return web.Response(text=self.body, status=self.status)
        finally:
            self.active -= 1

    async def start(self, port: int = 0) -> FakeServer:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_hits(self, count: int, timeout: float = 5.0) -> None:
        event = asyncio.Event()
        if self.hits >= count:
            return
        self._hit_waiters.append((count, event))
        await asyncio.wait_for(event.wait(), timeout)


class Scrapes:
    """Records every scrape attempt via the scraper's listener; lets a test await the n-th one."""

    def __init__(self, scraper: MetricsScraper) -> None:
        self.results: dict[str, list[bool]] = {}
        self.backoffs: dict[str, list[float]] = {}
        self._scraper = scraper
        self._waiters: list[tuple[Callable[[], bool], asyncio.Event]] = []
        scraper.on_scrape(self._record)

    def _record(self, endpoint: Endpoint, ok: bool) -> None:
        self.results.setdefault(endpoint.address, []).append(ok)
        self.backoffs.setdefault(endpoint.address, []).append(self._scraper.stats[endpoint.address].backoff)
        for condition, event in self._waiters:
            if condition():
                event.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        if condition():
            return
        event = asyncio.Event()
        self._waiters.append((condition, event))
        await asyncio.wait_for(event.wait(), timeout)

    async def count(self, address: str, n: int, ok: bool | None = None, timeout: float = 5.0) -> None:
        def done() -> bool:
            results = self.results.get(address, [])
            return len([r for r in results if ok is None or r == ok]) >= n

        await self.until(done, timeout)


@pytest.fixture
async def servers() -> AsyncIterator[list[FakeServer]]:
    started: list[FakeServer] = []
    yield started
    for server in started:
        await server.stop()


async def serve(
    servers: list[FakeServer], body: str = VLLM, *, delay: float = 0.0, status: int = 200, port: int = 0
) -> FakeServer:
    server = await FakeServer(body, delay, status).start(port)
    servers.append(server)
    return server


@contextlib.asynccontextmanager
async def running(scraper: MetricsScraper) -> AsyncIterator[MetricsScraper]:
    await scraper.start()
    try:
        yield scraper
    finally:
        await scraper.stop()


@pytest.mark.parametrize("engine", list(PAGES))
async def test_scrape_once_reads_each_engine(servers: list[FakeServer], engine: str) -> None:
    body, (waiting, running_, kv) = PAGES[engine]
    server = await serve(servers, body)
    endpoint = Endpoint(server.address, engine=engine)
    scraper = MetricsScraper(EndpointPool([endpoint]))
    try:
        before = time.monotonic()
        assert await scraper.scrape_once(endpoint)
    finally:
        await scraper.stop()
    metrics = endpoint.metrics
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (waiting, running_, kv)
    assert before <= metrics.updated_at <= time.monotonic()
    assert scraper.stats[endpoint.address].ok == 1
    if engine == "vllm":
        assert metrics.running_loras == {"sql"} and metrics.max_lora == 2


async def test_scrapes_continuously_on_one_keep_alive_connection(servers: list[FakeServer]) -> None:
    server = await serve(servers)
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01)
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(endpoint.address, 5, ok=True)
        client = scraper._clients[endpoint.address]
        stamp = endpoint.metrics.updated_at
        await scrapes.count(endpoint.address, 6, ok=True)
        assert endpoint.metrics.updated_at > stamp  # a new snapshot each time
        assert scraper._clients[endpoint.address] is client and client.connects == 1
    assert scraper._clients == {} and client._conn is None  # stop() closed the connection
    assert scraper.stats[endpoint.address].failed == 0


async def test_malformed_page_is_logged_once_per_problem(
    servers: list[FakeServer], caplog: pytest.LogCaptureFixture
) -> None:
    body = (
        VLLM
        + 'vllm:cache_config_info{block_size="16" 1\n'  # unparsable
        + 'vllm:num_requests_waiting{model_name="n"} NaN\n'  # non-finite
    )
    server = await serve(servers, body)
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01)
    scrapes = Scrapes(scraper)
    with caplog.at_level(logging.WARNING, logger="epp.datastore.scraper"):
        async with running(scraper):
            await scrapes.count(endpoint.address, 8, ok=True)  # usable despite the problems
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(endpoint.address in message for message in warnings)
    assert any("unparsable vllm:cache_config_info" in m for m in warnings)
    assert any("non-finite vllm:num_requests_waiting" in m for m in warnings)
    assert endpoint.metrics.waiting == 1.0 and endpoint.reachable


async def test_page_without_required_metrics_fails_but_stays_reachable(
    servers: list[FakeServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(servers, "<html>hello</html>")
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01)
    scrapes = Scrapes(scraper)
    with caplog.at_level(logging.WARNING, logger="epp.datastore.scraper"):
        async with running(scraper):
            await scrapes.count(endpoint.address, 6, ok=False)
    assert endpoint.metrics.updated_at == 0.0  # never replaced: readers see it as stale
    assert endpoint.reachable
    stats = scraper.stats[endpoint.address]
    assert stats.ok == 0 and stats.failed >= 6 and stats.backoff == 0.0
    assert "missing vllm:num_requests_waiting" in stats.last_error
    assert len([r for r in caplog.records if "missing" in r.getMessage()]) == 3  # one per missing metric


async def test_slow_server_is_never_scraped_concurrently(servers: list[FakeServer]) -> None:
    # Each response takes 5 intervals: a naive ticker would have five requests in flight.
    server = await serve(servers, delay=0.05)
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01, timeout=1.0)
    async with running(scraper):
        await server.wait_hits(4)
    assert server.max_active == 1
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    assert min(gaps) >= 0.045  # the next scrape waited for the previous one; no catch-up burst
    assert scraper.stats[endpoint.address].ok >= 3


async def test_timeout_fails_the_scrape_without_pile_up(servers: list[FakeServer]) -> None:
    server = await serve(servers, delay=30.0)
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01, timeout=0.05, unreachable_after=2)
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(endpoint.address, 3, ok=False)
        assert not endpoint.reachable
    assert server.max_active == 1
    stats = scraper.stats[endpoint.address]
    assert stats.last_error == "timeout after 0.05 s"
    assert stats.consecutive_failures >= 3


async def test_dead_endpoint_backs_off_and_recovers(servers: list[FakeServer]) -> None:
    server = await serve(servers)
    port = server.port
    await server.stop()  # the port is now closed: connections are refused
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), interval=0.01, max_backoff=0.08, unreachable_after=3)
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(endpoint.address, 2, ok=False)
        assert endpoint.reachable  # not yet: 3 failures needed
        await scrapes.count(endpoint.address, 5, ok=False)
        assert not endpoint.reachable
        assert scrapes.backoffs[endpoint.address][:5] == [0.02, 0.04, 0.08, 0.08, 0.08]  # doubles, capped
        assert "ConnectionRefusedError" in scraper.stats[endpoint.address].last_error

        await serve(servers, port=port)
        await scrapes.count(endpoint.address, 1, ok=True)
        assert endpoint.reachable
        assert endpoint.metrics.age() < 1.0
        stats = scraper.stats[endpoint.address]
        assert stats.consecutive_failures == 0 and stats.backoff == 0.0


def test_backoff_schedule_with_defaults() -> None:
    scraper = MetricsScraper(EndpointPool())
    assert [scraper.backoff(k) for k in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert scraper.backoff(10_000) == 2.0


async def test_pool_changes_start_and_cancel_tasks(servers: list[FakeServer]) -> None:
    one, two, three = [await serve(servers) for _ in range(3)]
    pool = EndpointPool([Endpoint(one.address), Endpoint(two.address)])
    scraper = MetricsScraper(pool, interval=0.01)
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(one.address, 2, ok=True)
        await scrapes.count(two.address, 2, ok=True)

        pool.replace([Endpoint(two.address), Endpoint(three.address)])
        hits_of_one = one.hits
        await scrapes.count(three.address, 3, ok=True)
        await scrapes.count(two.address, len(scrapes.results[two.address]) + 3, ok=True)
        assert one.hits <= hits_of_one + 1  # at most a request already on the wire when it was removed
        assert set(scraper.stats) == {two.address, three.address}
        assert pool.all()[0].metrics.age() < 1.0

        pool.replace([])
        assert scraper.stats == {}
    # After stop, pool changes start nothing.
    pool.replace([Endpoint(one.address)])
    assert scraper._tasks == {}


async def test_scrape_all_reports_successes_and_failures(servers: list[FakeServer]) -> None:
    good = await serve(servers)
    bad = await serve(servers, status=500)
    endpoints = [Endpoint(good.address), Endpoint(bad.address)]
    scraper = MetricsScraper(EndpointPool(endpoints))
    try:
        assert await scraper.scrape_all() == 1
    finally:
        await scraper.stop()
    assert endpoints[0].metrics.age() < 1.0
    assert endpoints[1].metrics.age() == float("inf")
    assert scraper.stats[bad.address].last_error == "HTTP 500"


def test_period_stretches_with_the_pool_to_bound_the_scrape_rate() -> None:
    def pool(n: int) -> EndpointPool:
        return EndpointPool([Endpoint(f"10.0.0.{i // 250}:{8000 + i}") for i in range(n)])

    assert MetricsScraper(pool(20)).period() == 0.05  # 400/s: under the default budget of 500/s
    assert MetricsScraper(pool(64)).period() == 0.128  # 64 / 500
    assert MetricsScraper(pool(256)).period() == 0.512  # 256 / 500
    assert MetricsScraper(pool(256), max_scrapes_per_second=None).period() == 0.05
    assert MetricsScraper(pool(10), interval=0.01, max_scrapes_per_second=100).period() == 0.1
    with pytest.raises(ValueError):
        MetricsScraper(pool(1), max_scrapes_per_second=0)


async def test_scrape_budget_stretches_and_follows_the_pool(
    servers: list[FakeServer], caplog: pytest.LogCaptureFixture
) -> None:
    fleet = [await serve(servers) for _ in range(4)]
    pool = EndpointPool([Endpoint(s.address) for s in fleet])
    scraper = MetricsScraper(pool, interval=0.01, max_scrapes_per_second=40)  # 4 endpoints: every 0.1 s
    caplog.set_level(logging.INFO, logger="epp.datastore.scraper")
    async with running(scraper):
        await fleet[0].wait_hits(4)
        for server in fleet:
            gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
            assert gaps and min(gaps) >= 0.07, gaps  # every ~0.1 s, not every 0.01 s

        pool.replace([Endpoint(fleet[0].address)])  # one endpoint left: every 1/40 s
        await asyncio.sleep(0.1)  # the sleep already scheduled with the old period ends
        hits = fleet[0].hits
        await asyncio.sleep(0.3)
        assert fleet[0].hits - hits >= 6  # ~12 at 0.025 s, 3 at the old 0.1 s
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert logged == [
        "scraping 4 endpoints every 0.1 s (interval 0.01 s, at most 40 scrapes/s)",
        "scraping 1 endpoints every 0.025 s (interval 0.01 s, at most 40 scrapes/s)",
    ]


async def test_loops_start_spread_over_the_period(servers: list[FakeServer]) -> None:
    fleet = [await serve(servers) for _ in range(8)]
    scraper = MetricsScraper(EndpointPool([Endpoint(s.address) for s in fleet]), interval=0.2)
    started = time.monotonic()
    async with running(scraper):
        for server in fleet:
            await server.wait_hits(1)
    firsts = sorted(server.arrivals[0] - started for server in fleet)
    assert firsts[-1] < 0.2 + 0.1  # each within its first period (plus slack for a loaded machine)
    assert firsts[-1] - firsts[0] > 0.03  # not one burst (8 uniform phases: P(spread <= 0.03) < 1e-4)
