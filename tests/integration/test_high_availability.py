"""Two picker processes' worth of servers (in-process) against the stand-in API server with leader election:
one SERVING, the standby warm (same endpoints, scraped) but NOT_SERVING; when the leader shuts down it
releases the Lease and the standby turns SERVING; when a leader dies without releasing, the standby takes
over once the Lease lapses. Hand-over times are measured and printed, never asserted (timing belongs to
benchmarks); every wait is on an event (the health Watch stream) under a hang guard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.kube_api import LEASES, PODS, POOLS, KubeApi, make_pod, make_pool

from epp.config import load_config
from epp.server import Server, required_permissions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GUARD = 60.0  # hang guard only
LEASE = {"lease_name": "llama-epp", "lease_duration_s": 2, "renew_deadline_s": 1.5, "retry_period_s": 0.5}


async def status(port: int, name: str = "readiness") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))
        return int(reply.status)


async def until_status(port: int, wanted: int, name: str = "readiness") -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async for update in stub.Watch(health_pb2.HealthCheckRequest(service=name)):
            if update.status == wanted:
                return


async def first_serving(servers: list[Server]) -> Server:
    """The replica whose readiness turns SERVING first (the one that won the Lease)."""
    watches = {asyncio.ensure_future(until_status(s.ports.health, SERVING)): s for s in servers}  # type: ignore[union-attr]
    done, pending = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return watches[done.pop()]


@pytest.fixture
async def cluster(upstreams: Any, tmp_path: Path) -> AsyncIterator[tuple[KubeApi, Any, list[Server]]]:
    api = KubeApi(bookmark_interval_s=0.2)
    await api.start()
    ups = await upstreams(1)
    api.put_pool(make_pool("llama", {"app": "llama"}, [ups[0].port]))
    api.put_pod(make_pod("model-0", "127.0.0.1", {"app": "llama"}))
    token = tmp_path / "token"
    token.write_text("test-token")
    servers: list[Server] = []

    async def replica(name: str) -> Server:
        config = load_config(None, {
            "server": {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "admin_port": 0,
                       "tls": {"enabled": False}, "drain_s": 3600, "grace_period_s": 5},
            "pool": {"name": "llama", "discovery": "kubernetes", "endpoints": [],
                     "kubernetes": {"inference_pool": "llama", "namespace": "default", "api_server": api.url,
                                    "token_file": str(token), "ca_file": None}},
            "leader_election": {"enabled": True, "namespace": "default", **LEASE},
            "scheduling": {"scrape": {"interval_s": 0.05}},
        })  # fmt: skip
        server = Server(config)
        await server.start()
        server.elector.identity = name  # two "pods" in one process
        servers.append(server)
        return server

    yield api, replica, servers
    for server in servers:
        await server.stop()
    await api.stop()


async def test_standby_is_warm_and_takes_over_when_the_leader_shuts_down(
    cluster: tuple[KubeApi, Any, list[Server]], capsys: pytest.CaptureFixture[str]
) -> None:
    api, replica, _ = cluster
    async with asyncio.timeout(GUARD):
        a = await replica("epp-a")
        await until_status(a.ports.health, SERVING)
        b = await replica("epp-b")
        # The standby: endpoints discovered and scraped, readiness off, and it does not steal the Lease.
        await asyncio.wait_for(b.discovery.synced.wait(), GUARD)
        await b.scraper.scrape_all()
        [endpoint] = list(b.pool)
        assert endpoint.metrics.updated_at > 0 and endpoint.reachable
        await api.wait_requests(lambda _: api.count("get", LEASES) >= 6)  # both renewing and checking
        assert (await status(a.ports.health), await status(b.ports.health)) == (SERVING, NOT_SERVING)
        assert await status(b.ports.health, "envoy.service.ext_proc.v3.ExternalProcessor") == NOT_SERVING
        assert api.lease("llama-epp")["spec"]["holderIdentity"] == "epp-a"  # type: ignore[index]

        # SIGTERM on the leader: readiness off and the Lease released at once; it keeps draining meanwhile.
        a.request_stop()
        began = time.perf_counter()
        draining = asyncio.ensure_future(a.shutdown())
        await until_status(b.ports.health, SERVING)
        handover = time.perf_counter() - began
        assert not draining.done()  # the standby took over while the old leader still drains
        assert await status(a.ports.health) == NOT_SERVING
        assert api.lease("llama-epp")["spec"]["holderIdentity"] == "epp-b"  # type: ignore[index]
        a.request_stop()  # end the old leader's drain window
        await draining

        # A standby that never led skips the drain window (drain_s is 3600 here): shutting down is prompt.
        c = await replica("epp-c")
        await asyncio.wait_for(c.discovery.synced.wait(), GUARD)
        await c.shutdown()
    with capsys.disabled():
        print(f"\n[ha] clean hand-over (leader SIGTERM -> standby readiness SERVING): {handover:.3f} s "
              f"(retry_period_s {LEASE['retry_period_s']})")  # fmt: skip


async def test_standby_takes_over_after_the_lease_of_a_dead_leader_lapses(
    cluster: tuple[KubeApi, Any, list[Server]], capsys: pytest.CaptureFixture[str]
) -> None:
    api, replica, _ = cluster
    async with asyncio.timeout(GUARD):
        a = await replica("epp-a")
        await until_status(a.ports.health, SERVING)
        b = await replica("epp-b")
        await asyncio.wait_for(b.discovery.synced.wait(), GUARD)
        await api.wait_requests(lambda _: api.count("update", LEASES) >= 3)  # a is renewing
        began = time.perf_counter()
        await a.elector.stop(release=False)  # the leader dies: no more renewals, no release
        await until_status(b.ports.health, SERVING)
        takeover = time.perf_counter() - began
        assert api.lease("llama-epp")["spec"]["holderIdentity"] == "epp-b"  # type: ignore[index]
        assert api.lease("llama-epp")["spec"]["leaseTransitions"] == 1  # type: ignore[index]
    with capsys.disabled():
        timings = f"lease_duration_s {LEASE['lease_duration_s']}, retry_period_s {LEASE['retry_period_s']}"
        print(f"\n[ha] takeover after a leader crash: {takeover:.3f} s ({timings})")


async def test_the_api_calls_made_are_exactly_the_declared_permissions(
    cluster: tuple[KubeApi, Any, list[Server]],
) -> None:
    """What tests/deploy checks the Role against (`required_permissions`) is what the code really calls."""
    api, replica, _ = cluster
    async with asyncio.timeout(GUARD):
        a = await replica("epp-a")
        await until_status(a.ports.health, SERVING)
        b = await replica("epp-b")
        await asyncio.wait_for(b.discovery.synced.wait(), GUARD)
        await api.wait_requests(lambda _: api.count("watch", PODS) >= 2 and api.count("watch", POOLS) >= 2)
        api.close_watches()  # and the watches resume
        await api.wait_requests(lambda _: api.count("watch", PODS) >= 4 and api.count("watch", POOLS) >= 4)
        a.request_stop()
        a.request_stop()  # no drain: release and stop now
        await a.shutdown()
        await until_status(b.ports.health, SERVING)
    groups = {kind.key: kind.group for kind in api.kinds.values()}
    resources = {kind.key: kind.resource for kind in api.kinds.values()}
    seen = {(groups[key], resources[key], verb) for verb, key, _ in api.requests}
    declared = {(g, r, v) for g, r, v, _ in required_permissions(a.config)}
    assert seen == declared
