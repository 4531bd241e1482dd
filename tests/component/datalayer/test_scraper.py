"""MetricsScraper with its real HTTP transport against local servers (aiohttp, 127.0.0.1, ephemeral ports):
each engine's page over the wire, one keep-alive connection, refused connections and recovery. Timing and
bookkeeping are tested on a virtual clock in tests/unit/datalayer/test_scraper.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from epp.config import ScrapeConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.scrape.scraper import MetricsScraper

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
    """A model server's /metrics over real HTTP: counts requests and how many run at once."""

    def __init__(self, body: str = VLLM, delay: float = 0.0, status: int = 200) -> None:
        self.body, self.delay, self.status = body, delay, status
        self.hits = 0
        self.active = 0
        self.max_active = 0
        self.port = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
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


class Scrapes:
    """Every scrape attempt via the scraper's listener; a test awaits the n-th one (an event, no timer)."""

    def __init__(self, scraper: MetricsScraper) -> None:
        self.results: dict[str, list[bool]] = {}
        self._changed = asyncio.Event()
        scraper.on_scrape(self._record)

    def _record(self, endpoint: Endpoint, ok: bool) -> None:
        self.results.setdefault(endpoint.address, []).append(ok)
        self._changed.set()

    async def count(self, address: str, n: int, ok: bool | None = None) -> None:
        while len([r for r in self.results.get(address, []) if ok in (None, r)]) < n:
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture
async def servers() -> AsyncIterator[list[FakeServer]]:
    started: list[FakeServer] = []
    yield started
    for server in started:
        await server.stop()


async def serve(
    servers: list[FakeServer], body: str = VLLM, *, status: int = 200, port: int = 0
) -> FakeServer:
    server = await FakeServer(body, 0.0, status).start(port)
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
        assert await scraper.scrape_once(endpoint)
    finally:
        await scraper.stop()
    metrics = endpoint.metrics
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (waiting, running_, kv)
    assert metrics.updated_at > 0
    assert scraper.stats[endpoint.address].ok == 1
    if engine == "vllm":
        assert metrics.running_loras == {"sql"} and metrics.max_lora == 2


async def test_scrapes_continuously_on_one_keep_alive_connection(servers: list[FakeServer]) -> None:
    server = await serve(servers)
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(EndpointPool([endpoint]), ScrapeConfig(interval_s=0.01))
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(endpoint.address, 5, ok=True)
        assert scraper._http is not None
        client = scraper._http._clients[endpoint.address]
        stamp = endpoint.metrics.updated_at
        await scrapes.count(endpoint.address, 6, ok=True)
        assert endpoint.metrics.updated_at > stamp  # a new snapshot each time
        assert scraper._http._clients[endpoint.address] is client and client.connects == 1
    assert scraper._http._clients == {} and client._conn is None  # stop() closed the connection
    assert scraper.stats[endpoint.address].failed == 0
    assert server.max_active == 1


async def test_refused_connections_mark_unreachable_and_a_restarted_server_recovers(
    servers: list[FakeServer],
) -> None:
    server = await serve(servers)
    port = server.port
    await server.stop()  # the port is now closed: connections are refused
    endpoint = Endpoint(server.address)
    scraper = MetricsScraper(
        EndpointPool([endpoint]), ScrapeConfig(interval_s=0.01, max_backoff_s=0.08, unreachable_after=3)
    )
    scrapes = Scrapes(scraper)
    async with running(scraper):
        await scrapes.count(endpoint.address, 3, ok=False)
        assert not endpoint.reachable
        assert "ConnectionRefusedError" in scraper.stats[endpoint.address].last_error

        await serve(servers, port=port)
        await scrapes.count(endpoint.address, 1, ok=True)
        assert endpoint.reachable and endpoint.metrics.updated_at > 0
        stats = scraper.stats[endpoint.address]
        assert stats.consecutive_failures == 0 and stats.backoff == 0.0


async def test_non_200_is_a_failed_scrape(servers: list[FakeServer]) -> None:
    bad = await serve(servers, status=500)
    endpoint = Endpoint(bad.address)
    scraper = MetricsScraper(EndpointPool([endpoint]))
    try:
        assert await scraper.scrape_all() == 0
    finally:
        await scraper.stop()
    assert endpoint.metrics.age() == float("inf")
    assert scraper.stats[bad.address].last_error == "HTTP 500"
