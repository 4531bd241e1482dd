"""The Kubernetes logic without HTTP: back-off arithmetic, the discovery's relist-on-410 and error recovery,
and the objective watch's handling of missing CRDs, each against a scripted fake client on a virtual-time
loop (tests/support/virtual_time.py), so every delay is asserted exactly and nothing waits for real."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.kube_api import make_pod, make_pool
from support.virtual_time import run_virtual

from epp.config import KubernetesConfig
from epp.datalayer.discovery.kubeapi import ApiError, Backoff, Gone, KeepAlive, parse_retry_after
from epp.datalayer.discovery.kubernetes import InferencePoolDiscovery
from epp.datalayer.discovery.objectives import ObjectiveWatch
from epp.datalayer.endpoints import EndpointPool

APP = {"app": "llama"}
PODS = "/api/v1/namespaces/default/pods"
POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/default/inferencepools"


# -- Backoff ----------------------------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets_after_a_quiet_period() -> None:
    now = [0.0]
    backoff = Backoff(base_s=0.5, cap_s=4.0, reset_after_s=60.0, jitter=0.0, clock=lambda: now[0])
    delays = []
    for _ in range(6):
        delays.append(backoff.next_delay(ApiError(0, "x", "y")))
        now[0] += 1.0
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    now[0] += 60.0
    assert backoff.next_delay(None) == 0.5  # 60 s without a failure: from the base again


def test_backoff_jitter_stays_within_its_band_and_retry_after_wins() -> None:
    backoff = Backoff(base_s=1.0, cap_s=100.0, jitter=0.2, clock=lambda: 0.0, rng=random.Random(4))
    for n in range(5):
        delay = backoff.next_delay(None)
        assert 2**n <= delay < 2**n * 1.2
    assert backoff.next_delay(ApiError(429, "TooManyRequests", "", retry_after=7)) == 7.0
    assert backoff.next_delay(ApiError(429, "TooManyRequests", "", retry_after=900)) == 60.0  # capped


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=4.0) == 6.0


def test_keepalive_socket_options() -> None:
    sock = KeepAlive().socket_factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("", 0)))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 25_000
        assert not sock.getblocking()
    finally:
        sock.close()


# -- a scripted client ------------------------------------------------------------------------------------

Step = Callable[[], Any]  # returns a list body or raises


class FakeClient:
    """Answers `list` from per-path scripts (each call takes the next step; the last one repeats) and runs
    `follow` from per-path scripts of ("event", type, object) / ("raise", exception) steps, then blocks."""

    def __init__(self) -> None:
        self.namespace, self.api_server = "default", "fake://api"
        self.config = KubernetesConfig(namespace="default", token_file=Path("/nonexistent"))
        self.lists: dict[str, list[Step]] = {}
        self.watches: dict[str, list[list[tuple[Any, ...]]]] = {}
        self.calls: list[tuple[float, str, str]] = []  # (loop time, verb, path)

    async def open(self) -> None:
        return None

    async def list(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        self.calls.append((asyncio.get_running_loop().time(), "list", path))
        script = self.lists[path]
        step = script.pop(0) if len(script) > 1 else script[0]
        return step()  # type: ignore[no-any-return]

    async def follow(self, path: str, params: dict[str, str], rv: str, on_event: Any) -> None:
        self.calls.append((asyncio.get_running_loop().time(), "watch", path))
        script = self.watches.get(path, [])
        for step in script.pop(0) if script else []:
            if step[0] == "event":
                on_event(step[1], step[2])
            else:
                raise step[1]
        await asyncio.Event().wait()  # a quiet, healthy watch

    def times(self, verb: str, path: str) -> list[float]:
        return [t for t, v, p in self.calls if (v, p) == (verb, path)]


def listing(*items: dict[str, Any], rv: str = "10") -> Step:
    return lambda: {"metadata": {"resourceVersion": rv}, "items": list(items)}


def failing(error: Exception) -> Step:
    def step() -> Any:
        raise error

    return step


async def run_discovery(
    client: FakeClient, until: Callable[[], bool], backoff: Backoff | None = None
) -> None:
    pool = EndpointPool()
    discovery = InferencePoolDiscovery(pool, client, "llama", backoff=backoff or Backoff(jitter=0.0))  # type: ignore[arg-type]
    await discovery.start()
    try:
        while not until():
            await asyncio.sleep(0.01)  # virtual time: the loop's own clock, no real waiting
    finally:
        await discovery.stop()


def test_410_on_a_watch_lists_again_after_the_base_delay() -> None:
    client = FakeClient()
    client.lists[POOLS] = [listing(make_pool("llama", APP, [8000]))]
    client.lists[PODS] = [listing(make_pod("a", "10.0.0.1", APP))]
    client.watches[PODS] = [[("raise", Gone(410, "Expired", "too old", verb="watch", path=PODS))]]

    run_virtual(run_discovery(client, lambda: len(client.times("list", PODS)) >= 2))
    first, second = client.times("list", PODS)[:2]
    assert second - first == pytest.approx(0.5)  # relisted at once, but never in a tight loop


def test_errors_back_off_exponentially_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = FakeClient()
    down = ApiError(0, "ClientConnectorError", "refused", verb="list", path=POOLS)
    client.lists[POOLS] = [failing(down)] * 4 + [listing(make_pool("llama", APP, [8000]))]
    client.lists[PODS] = [listing()]

    run_virtual(run_discovery(client, lambda: len(client.times("list", PODS)) >= 1))
    times = client.times("list", POOLS)
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    lost = [r for r in caplog.records if "lost the API server" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert any("recovered after: connection" in r.getMessage() for r in caplog.records)


def test_429_waits_for_retry_after() -> None:
    client = FakeClient()
    throttled = ApiError(429, "TooManyRequests", "slow down", verb="list", path=POOLS, retry_after=7)
    client.lists[POOLS] = [failing(throttled), listing(make_pool("llama", APP, [8000]))]
    client.lists[PODS] = [listing()]

    run_virtual(run_discovery(client, lambda: len(client.times("list", PODS)) >= 1))
    first, second = client.times("list", POOLS)[:2]
    assert second - first == pytest.approx(7.0)


def test_pool_spec_change_relists_with_the_new_selector() -> None:
    client = FakeClient()
    client.lists[POOLS] = [listing(make_pool("llama", APP, [8000]))]
    client.lists[PODS] = [listing()]
    moved = make_pool("llama", {"app": "blue"}, [8000])
    client.watches[POOLS] = [[("event", "MODIFIED", moved)]]
    run_virtual(run_discovery(client, lambda: len(client.times("list", PODS)) >= 2))


# -- the objective watch ----------------------------------------------------------------------------------


def test_missing_crds_warn_once_and_are_checked_again_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = FakeClient()
    gie = "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/default"
    llmd = "/apis/llm-d.ai/v1alpha2/namespaces/default"
    missing = ApiError(404, "NotFound", "the server could not find the requested resource", verb="list")
    for base in (gie, llmd):
        client.lists[f"{base}/inferencemodelrewrites"] = [listing()]
        client.lists[f"{base}/inferenceobjectives"] = [listing()]
    client.lists[f"{llmd}/inferenceobjectives"] = [failing(missing)] * 3 + [listing()]
    applied: list[Any] = []

    async def main() -> None:
        watch = ObjectiveWatch(
            client,  # type: ignore[arg-type]
            "llama",
            ["inference.networking.x-k8s.io/v1alpha2", "llm-d.ai/v1alpha2"],
            lambda models, objectives: applied.append((models, objectives)),
            missing_retry_s=60.0,
        )
        await watch.start()
        await watch.synced.wait()  # a missing CRD does not hold readiness back
        while len(client.times("list", f"{llmd}/inferenceobjectives")) < 4:
            await asyncio.sleep(1)
        await watch.stop()

    run_virtual(main())
    times = client.times("list", f"{llmd}/inferenceobjectives")
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([60.0, 60.0, 60.0])
    warnings = [r for r in caplog.records if "not served by the API server" in r.getMessage()]
    assert len(warnings) == 1 and "InferenceObjective (llm-d.ai/v1alpha2)" in warnings[0].getMessage()
    assert any("listed again after: missing" in r.getMessage() for r in caplog.records)
    assert applied == []  # nothing to apply: no objects anywhere
