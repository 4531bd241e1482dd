"""Keep every endpoint's `metrics` fresh by scraping its Prometheus page (`http://{address}/metrics`).

One asyncio task per endpoint of the pool, each with its own persistent HTTP/1.1 connection
(`http_get.KeepAliveGet`: at most one request in flight per endpoint, reconnects when the server closed it).
The pool's change listener starts tasks for new endpoints and cancels those (and connections) of removed ones.

Timing (`ScrapeConfig`; defaults: `interval` 0.05 s, `timeout` 1.0 s for the whole request including
connecting, `max_backoff` 2.0 s, `max_scrapes_per_second` 500):

- Each endpoint is scraped every `period = ScrapeConfig.period(len(pool))` =
  `max(interval, len(pool) / max_scrapes_per_second)`: pools of up
  to 25 endpoints at the 50 ms interval, bigger ones less often (64 endpoints: every 128 ms; 256: 512 ms)
  so that scraping stays under ~0.08 core (see Cost). `max_scrapes_per_second=None` removes the cap.
  A stretched period is logged at INFO when the pool changes.
- Scrapes of one endpoint never overlap: scrape n+1 starts at `max(start_n + period, end_n)`, so a slow
  server is scraped back to back, never concurrently, and missed periods are not caught up in a burst.
  An endpoint's loop starts at a random phase within the first period, so the pool's scrapes are spread
  over the period instead of arriving in one burst (`scrape_all()` is what scrapes everything at once).
- A scrape *fails* on a connection error, a timeout, a malformed or oversized (8 MiB) response or a non-200
  status. After k consecutive failures the next attempt waits `min(max_backoff, interval * 2**k)` after the
  failure (0.1, 0.2, 0.4, 0.8, 1.6, 2.0 s with the defaults), and never less than the period after its
  start. After `unreachable_after` (3) consecutive failures `endpoint.reachable` becomes False; the next
  success sets it back to True and ends the back-off.
- A page that answers 200 but lacks a required signal (see `metrics_parse`) is a *bad page*: counted as
  failed and `metrics` is not replaced, but it neither backs off nor marks the endpoint unreachable (the
  server is up, e.g. still loading its model).
- A success replaces `endpoint.metrics` with a new `MetricsSnapshot` stamped with `time.monotonic()`.

Failures never touch `metrics`, so staleness is for readers to judge from `endpoint.metrics.age()`:
about the period plus the scrape's duration (≈ 0.05 to 0.1 s) is fresh; above 0.2 s the saturation check
counts the endpoint as saturated (upstream default: keep the period below it); above 2 s pool-level gauges
ignore it; infinity means never scraped successfully.

Cost: CPU of the scraper's process per scrape of a 32 KB vLLM page served over loopback by another process
(`benchmarks/bench_scrape.py`, results in `benchmarks/results/scrape.json`; 2 shared cores under load, best
of 3 rounds, arms back to back; ranges span the asyncio and uvloop event loops):

                         ms/scrape      64 x 20 Hz      256 x 20 Hz
    aiohttp (before)     0.25-0.32      0.40-0.41 core  1.27-1.47 cores (could not keep up: ~1 core used)
    KeepAliveGet (now)   0.12-0.17      0.17-0.21 core  0.62-0.64 core; 0.28-0.30 with the default cap

i.e. 0.42-0.60x of aiohttp's CPU (median of paired rounds per setting). Of a scrape now, decoding and
parsing take ~0.04 ms, system time (loopback send/recv, epoll) ~0.035 ms, the event loop's task and timer
machinery ~0.025 ms; the client's own Python is the remaining few dozen µs.

Problems in a page (malformed line, missing metric, NaN) are logged at WARNING once per endpoint and kind
of problem, not per scrape; an endpoint going unreachable is logged once at WARNING, its recovery at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from epp.config import ScrapeConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.scrape.extract import parse_metrics
from epp.datalayer.scrape.http_get import HttpGetError, KeepAliveGet

log = logging.getLogger(__name__)

ScrapeListener = Callable[[Endpoint, bool], None]
# GET an endpoint's metrics page: (HTTP status, body). Raises TimeoutError, OSError or HttpGetError.
Fetch = Callable[[Endpoint], Awaitable[tuple[int, bytes]]]


class HttpFetch:
    """The production transport: one keep-alive HTTP/1.1 connection per endpoint (`KeepAliveGet`)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path if path.startswith("/") else "/" + path
        self.timeout = timeout
        self._clients: dict[str, KeepAliveGet] = {}

    async def __call__(self, endpoint: Endpoint) -> tuple[int, bytes]:
        client = self._clients.get(endpoint.address)
        if client is None:
            client = self._clients[endpoint.address] = KeepAliveGet.for_address(endpoint.address, self.path)
        return await client.get(self.timeout)

    def forget(self, keep: set[str]) -> None:
        """Close the connections of addresses not in `keep` (endpoints that left the pool)."""
        for address in [a for a in self._clients if a not in keep]:
            self._clients.pop(address).close()

    def close(self) -> None:
        self.forget(set())


@dataclass(slots=True)
class ScrapeStats:
    """Counters of one endpoint's scrapes (exported as Prometheus metrics elsewhere)."""

    ok: int = 0
    failed: int = 0  # transport failures and bad pages
    consecutive_failures: int = 0  # transport failures since the last success (drives back-off)
    backoff: float = 0.0  # delay before the next attempt while failing, 0 when healthy
    last_error: str = ""
    last_duration: float = 0.0  # seconds the last attempt took


class MetricsScraper:
    """Scrapes every endpoint of `pool` from `start()` until `stop()`.

    For readiness, scrape everything once before serving: `await scraper.scrape_all()` (each endpoint
    either succeeded or failed by the time it returns), then `await scraper.start()`.
    """

    def __init__(
        self,
        pool: EndpointPool,
        config: ScrapeConfig | None = None,
        *,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`fetch` replaces the HTTP transport (tests); `clock` stamps `MetricsSnapshot.updated_at`; `rng`
        draws each loop's start phase."""
        config = config or ScrapeConfig()
        self.config = config
        self.pool = pool
        self.interval = config.interval_s
        self.timeout = config.timeout_s
        self.max_backoff = config.max_backoff_s
        self.unreachable_after = config.unreachable_after
        self._http: HttpFetch | None = None
        if fetch is None:
            fetch = self._http = HttpFetch(config.path, config.timeout_s)
        self._fetch = fetch
        self._clock = clock
        self._rng = rng or random.Random()
        self.stats: dict[str, ScrapeStats] = {}  # by address, for endpoints of the pool
        self._tasks: dict[str, tuple[Endpoint, asyncio.Task[None]]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned: dict[str, set[tuple[str, str]]] = {}
        self._listeners: list[ScrapeListener] = []
        self._running = False
        self._logged_period = self.interval
        self._loop: asyncio.AbstractEventLoop | None = None
        pool.on_changed(self._sync)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start one scrape loop per endpoint of the pool (and follow the pool's changes)."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._sync()

    async def stop(self) -> None:
        """Cancel and await every scrape loop, then close every connection."""
        self._running = False
        tasks = [task for _, task in self._tasks.values()] + list(self._cancelled)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            self._http.close()

    def on_scrape(self, listener: ScrapeListener) -> None:
        """Call `listener(endpoint, ok)` after every scrape attempt (after stats and metrics are updated)."""
        self._listeners.append(listener)

    def period(self) -> float:
        """Per-endpoint scrape period for the pool's current size (`ScrapeConfig.period`; re-read before
        every sleep, so it follows the pool)."""
        return self.config.period(len(self.pool))

    def backoff(self, failures: int) -> float:
        """Delay before the next attempt after `failures` consecutive failures: min(max, interval * 2**k)."""
        return min(self.max_backoff, self.interval * 2 ** min(failures, 32))

    # -- scraping --------------------------------------------------------------------------------------

    async def scrape_all(self) -> int:
        """Scrape every endpoint of the pool once, concurrently. Returns how many succeeded."""
        results = await asyncio.gather(*(self.scrape_once(e) for e in self.pool.all()))
        return sum(results)

    async def scrape_once(self, endpoint: Endpoint) -> bool:
        """Scrape `endpoint` now (waiting for a scrape of it already in flight, never overlapping one).
        Updates `endpoint.metrics`, `endpoint.reachable` and the stats; True on success. Never raises
        (except CancelledError)."""
        lock = self._locks.get(endpoint.address)
        if lock is None:
            lock = self._locks[endpoint.address] = asyncio.Lock()
        async with lock:
            ok = await self._scrape(endpoint)
        for listener in self._listeners:
            try:
                listener(endpoint, ok)
            except Exception:
                log.exception("scrape listener failed")
        return ok

    async def _scrape(self, endpoint: Endpoint) -> bool:
        stats = self.stats.get(endpoint.address)
        if stats is None:
            stats = self.stats[endpoint.address] = ScrapeStats()
        clock = self._clock
        started = clock()
        try:
            status, body = await self._fetch(endpoint)
        except TimeoutError:
            return self._failed(endpoint, stats, started, f"timeout after {self.timeout:g} s")
        except (HttpGetError, OSError, ValueError) as exc:  # ValueError: malformed address
            return self._failed(endpoint, stats, started, f"{type(exc).__name__}: {exc}")
        if status != 200:
            return self._failed(endpoint, stats, started, f"HTTP {status}")

        result = parse_metrics(body.decode("utf-8", "replace"), endpoint.engine)
        now = clock()
        stats.last_duration = now - started
        for problem in result.problems:
            self._warn_once(endpoint, (problem.kind, problem.metric), str(problem))
        if not result.ok:
            stats.failed += 1
            stats.last_error = "bad page: " + "; ".join(str(p) for p in result.problems)
            self._recovered(endpoint, stats)  # it answered: reachable, no back-off
            return False
        endpoint.metrics = result.snapshot(now)
        stats.ok += 1
        self._recovered(endpoint, stats)
        return True

    def _failed(self, endpoint: Endpoint, stats: ScrapeStats, started: float, error: str) -> bool:
        stats.failed += 1
        stats.consecutive_failures += 1
        stats.backoff = self.backoff(stats.consecutive_failures)
        stats.last_error = error
        stats.last_duration = self._clock() - started
        if endpoint.reachable and stats.consecutive_failures >= self.unreachable_after:
            endpoint.reachable = False
            log.warning(
                "endpoint %s unreachable after %d failed scrapes (%s); retrying every %g s at most",
                endpoint.address,
                stats.consecutive_failures,
                error,
                self.max_backoff,
            )
        return False

    def _recovered(self, endpoint: Endpoint, stats: ScrapeStats) -> None:
        if not endpoint.reachable:
            log.info(
                "endpoint %s reachable again after %d failures", endpoint.address, stats.consecutive_failures
            )
        endpoint.reachable = True
        stats.consecutive_failures = 0
        stats.backoff = 0.0

    def _warn_once(self, endpoint: Endpoint, key: tuple[str, str], message: str) -> None:
        seen = self._warned.setdefault(endpoint.address, set())
        if key not in seen:
            seen.add(key)
            log.warning(
                "metrics of %s (%s): %s (logged once per endpoint)",
                endpoint.address,
                endpoint.engine,
                message,
            )

    async def _run(self, endpoint: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        stats = self.stats.setdefault(endpoint.address, ScrapeStats())
        # Start at a random phase of the period: loops started together (start(), a new pool) would otherwise
        # keep scraping in one burst per period, stalling the request path sharing this event loop.
        await asyncio.sleep(self._rng.uniform(0.0, self.period()))
        while True:
            started = loop.time()
            try:
                await self.scrape_once(endpoint)
            except Exception:  # a bug must not end this endpoint's scraping for good
                self._warn_once(endpoint, ("error", "scrape"), "unexpected error while scraping")
                log.debug("scrape of %s failed", endpoint.address, exc_info=True)
            # Healthy: keep the cadence from the start of this scrape (no catch-up); failing: back off, but
            # never retry faster than the (possibly stretched) period.
            delay = started + self.period() - loop.time()
            if stats.consecutive_failures:
                delay = max(delay, stats.backoff)
            await asyncio.sleep(max(0.0, delay))

    # -- pool membership ----------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Make the set of scrape loops match the pool (runs on every pool change)."""
        if not self._running or self._loop is None:
            return
        current = {e.address: e for e in self.pool.all()}
        for address, (endpoint, task) in list(self._tasks.items()):
            if current.get(address) is not endpoint:
                task.cancel()
                self._cancelled.add(task)
                task.add_done_callback(self._cancelled.discard)
                del self._tasks[address]
                self.stats.pop(address, None)
                self._locks.pop(address, None)
                self._warned.pop(address, None)
        if self._http is not None:
            self._http.forget(set(current))
        for address, endpoint in current.items():
            if address not in self._tasks:
                task = self._loop.create_task(self._run(endpoint), name=f"scrape {address}")
                self._tasks[address] = (endpoint, task)
        period = self.period()
        if period != self._logged_period and (period > self.interval or self._logged_period > self.interval):
            log.info(
                "scraping %d endpoints every %.3g s (interval %g s, at most %g scrapes/s)",
                len(current), period, self.interval, self.config.max_scrapes_per_second or float("inf"),
            )  # fmt: skip
        self._logged_period = period
