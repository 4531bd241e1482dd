"""Scheduling decisions end to end: the picker in-process, real Envoy in front, real HTTP upstreams whose
`/metrics` pages the tests set. Requests go through Envoy; each upstream answers with its own address, so
the tests see where the picker sent them.

Requests are sent one at a time and each waits until the picker has released the previous request's
in-flight count (the ext_proc stream ends slightly after the client has its response), so the decisions
depend only on the metrics the test set and the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from epp.config import load_config
from epp.server import Server
from epp_lab.envoy_launcher import Envoy, EnvoyOptions

pytestmark = pytest.mark.envoy

SEED = 1234
ADAPTER = "adapter-x"


class Harness:
    """A running picker + Envoy over some upstreams, and a client session to talk through Envoy."""

    def __init__(self, server: Server, envoy: Envoy, session: aiohttp.ClientSession, upstreams: list[Any]):
        self.server = server
        self.envoy = envoy
        self.session = session
        self.upstreams = upstreams

    async def refresh_metrics(self) -> None:
        """Scrape every upstream now, so the next decision sees the metrics the test just set."""
        scraper = self.server.scraper
        assert scraper is not None
        assert await scraper.scrape_all() == len(self.upstreams)  # type: ignore[attr-defined]

    async def idle(self) -> None:
        """Wait until the picker holds no in-flight request (previous streams have ended): polls the
        counts, bounded only by a hang guard."""
        try:
            async with asyncio.timeout(30):
                while any(e.inflight_requests for e in self.server.pool):
                    await asyncio.sleep(0.001)
        except TimeoutError:
            raise AssertionError("in-flight counts did not drain") from None

    async def send(
        self,
        prompt: str,
        *,
        model: str = "base-model",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        await self.idle()
        body = {"model": model, "prompt": prompt, "max_tokens": 16}
        async with self.session.post(
            f"{self.envoy.url}/v1/completions", json=body, headers=headers or {}
        ) as response:
            payload = await response.json(content_type=None)
            return response.status, payload

    async def served_by(self, prompt: str, **kwargs: Any) -> str:
        status, payload = await self.send(prompt, **kwargs)
        assert status == 200, payload
        return str(payload["upstream"])


@pytest.fixture
async def harness(upstreams: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await harness(n, config_overrides, extra_http_filters)` → a Harness (torn down after)."""
    stack = contextlib.AsyncExitStack()

    async def make(
        count: int = 3,
        overrides: dict[str, Any] | None = None,
        extra_http_filters: list[dict[str, Any]] | None = None,
    ) -> Harness:
        servers = await upstreams(count)
        config = load_config(
            None,
            _merge(
                {
                    "server": {
                        "tls": {"enabled": False},
                        "extproc_port": 0,
                        "health_port": 0,
                        "metrics_port": 0,
                        "grace_period_s": 0,
                    },
                    "pool": {"endpoints": [u.address for u in servers]},
                    "scheduling": {
                        "seed": SEED,
                        "scrape": {"interval_s": 0.02},
                        # A loaded test box must not turn metrics "stale" (saturated) between scrapes.
                        "saturation": {"metrics_staleness_s": 5.0},
                    },
                },
                overrides or {},
            ),
        )
        server = Server(config)
        ports = await server.start()
        stack.push_async_callback(server.stop)
        envoy = Envoy(
            EnvoyOptions(shape="gateway", epp_port=ports.extproc, extra_http_filters=extra_http_filters or [])
        )
        await envoy.start()
        stack.push_async_callback(envoy.stop)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        stack.push_async_callback(session.close)
        h = Harness(server, envoy, session, servers)
        await h.refresh_metrics()
        return h

    yield make
    await stack.aclose()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def short_prompt(i: int) -> str:
    # Under one 64-character block: no prefix affinity, so only load decides.
    return f"question {i}: what is {i} squared?"


async def test_long_queue_replica_gets_little_traffic(harness: Callable[..., Any]) -> None:
    h = await harness(3)
    busy, *others = h.upstreams
    busy.metrics.waiting = 50
    await h.refresh_metrics()
    served = Counter([await h.served_by(short_prompt(i)) for i in range(30)])
    assert served[busy.address] <= 3, served
    # The idle replicas tie on every score: the random tie-break spreads the load over both.
    assert all(served[u.address] >= 5 for u in others), served


async def test_full_kv_cache_replica_gets_little_traffic(harness: Callable[..., Any]) -> None:
    h = await harness(3)
    full, *others = h.upstreams
    full.metrics.kv_usage = 0.99
    await h.refresh_metrics()
    served = Counter([await h.served_by(short_prompt(i)) for i in range(30)])
    assert served[full.address] <= 3, served
    assert all(served[u.address] >= 5 for u in others), served


async def test_lora_request_goes_to_replica_running_the_adapter(harness: Callable[..., Any]) -> None:
    h = await harness(
        3, {"models": [{"name": ADAPTER, "targets": [{"model": ADAPTER, "lora": True}]}, {"name": "*"}]}
    )
    warm, *cold = h.upstreams
    for u in h.upstreams:
        u.metrics.max_lora = 2
    warm.metrics.running_loras = [ADAPTER]
    for u in cold:
        u.metrics.running_loras = ["other-a", "other-b"]  # slots full: the adapter would have to wait
    await h.refresh_metrics()
    assert {await h.served_by(short_prompt(i), model=ADAPTER) for i in range(10)} == {warm.address}
    # The upstream was asked for the adapter by name (no rewrite needed).
    assert {r["model"] for r in warm.requests} == {ADAPTER}
    # Base-model requests are not pulled to the adapter replica.
    base = Counter([await h.served_by(short_prompt(i)) for i in range(20)])
    assert len(base) == 3, base


async def test_lora_adapter_detected_from_metrics_and_free_slot_preferred(
    harness: Callable[..., Any],
) -> None:
    h = await harness(3)  # no model rules: the adapter is recognised from the replicas' metrics
    running, free, full = h.upstreams
    for u in h.upstreams:
        u.metrics.max_lora = 1
    running.metrics.running_loras = [ADAPTER]
    full.metrics.running_loras = ["other"]
    await h.refresh_metrics()
    assert {await h.served_by(short_prompt(i), model=ADAPTER) for i in range(8)} == {running.address}
    # The replica running it gets busy: the one with a free adapter slot is next best, not the full one.
    running.metrics.waiting = 30
    running.metrics.kv_usage = 0.9
    await h.refresh_metrics()
    assert {await h.served_by(short_prompt(i), model=ADAPTER) for i in range(8)} == {free.address}


def long_prompt(shared: str, i: int) -> str:
    return shared + f" -- follow-up question number {i}?"


SHARED = "".join(f"[doc line {i:03d}] the quick brown fox jumps over the lazy dog. " for i in range(80))


async def test_shared_prefix_sticks_then_moves_when_the_warm_replica_saturates(
    harness: Callable[..., Any],
) -> None:
    assert len(SHARED) >= 2048
    h = await harness(3)
    first = await h.served_by(long_prompt(SHARED, 0))
    stuck = [await h.served_by(long_prompt(SHARED, i)) for i in range(1, 10)]
    assert set(stuck) == {first}, "a repeated long prefix should stay on the cache-warm replica"

    warm = next(u for u in h.upstreams if u.address == first)
    # Slightly busier but within the load gap: locality is kept.
    warm.metrics.waiting = 3
    await h.refresh_metrics()
    assert {await h.served_by(long_prompt(SHARED, i)) for i in range(10, 15)} == {first}

    # Far ahead of the others: affinity yields, and the prefix settles on one new replica.
    warm.metrics.waiting = 40
    await h.refresh_metrics()
    moved = [await h.served_by(long_prompt(SHARED, i)) for i in range(15, 25)]
    assert first not in moved
    assert len(set(moved)) == 1, f"the prefix should regroup on one replica, got {Counter(moved)}"

    # The warm replica recovers: both it and the new home hold the prefix; it stays local.
    warm.metrics.waiting = 0
    await h.refresh_metrics()
    recovered = {await h.served_by(long_prompt(SHARED, i)) for i in range(25, 30)}
    assert recovered <= {first, moved[0]}


async def test_inflight_load_moves_a_prefix_off_a_busy_replica(harness: Callable[..., Any]) -> None:
    h = await harness(3)
    first = await h.served_by(long_prompt(SHARED, 0))
    # Scraped metrics still say idle, but the picker has many requests outstanding on the warm replica.
    warm = h.server.pool.get(first)
    assert warm is not None
    await h.idle()
    held = 24  # load 24 vs 0: prefix affinity discounted to load_gap / 24
    for _ in range(held):
        warm.acquire(2000)
    try:
        # Sent directly (h.send would wait for our held count to drain).
        async with h.session.post(
            f"{h.envoy.url}/v1/completions", json={"model": "base-model", "prompt": long_prompt(SHARED, 1)}
        ) as response:
            assert response.status == 200
            assert (await response.json())["upstream"] != first
    finally:
        for _ in range(held):
            warm.release(2000)


async def test_sheddable_request_gets_429_while_saturated(harness: Callable[..., Any]) -> None:
    h = await harness(3, {"objectives": [{"name": "batch", "priority": -1}]})
    batch = {"x-gateway-inference-objective": "batch"}

    # Not saturated: batch traffic is served.
    status, payload = await h.send("hello", headers=batch)
    assert status == 200, payload

    for i, u in enumerate(h.upstreams):
        if i % 2:
            u.metrics.waiting = 6
        else:
            u.metrics.kv_usage = 0.85
    await h.refresh_metrics()

    reached = sum(len(u.requests) for u in h.upstreams)
    status, payload = await h.send("hello", headers=batch)
    assert status == 429, payload
    assert payload["error"]["code"] == "saturated_shed"
    assert "saturated" in payload["error"]["message"]
    assert sum(len(u.requests) for u in h.upstreams) == reached, "the shed request reached a replica"

    status, payload = await h.send("hello")
    assert status == 200, payload
    status, payload = await h.send("hello", headers={"x-gateway-inference-objective": "unknown"})
    assert status == 200, payload


SUBSET_HINT_FILTER = {
    # Stands in for a gateway that passes a subset hint: request metadata the ext_proc filter forwards.
    "name": "envoy.filters.http.set_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [
            {
                "metadata_namespace": "envoy.lb.subset_hint",
                "value": {"x-gateway-destination-endpoint-subset": ["10.255.255.1:8000"]},
            }
        ],
    },
}


async def test_no_eligible_endpoint_is_503_not_saturated(harness: Callable[..., Any]) -> None:
    h = await harness(2, extra_http_filters=[SUBSET_HINT_FILTER])
    status, payload = await h.send("hello")
    assert status == 503, payload
    assert payload["error"]["code"] == "subset_empty"
    assert "saturated" not in payload["error"]["message"]
    assert all(not u.requests for u in h.upstreams)
