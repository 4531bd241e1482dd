"""InferencePoolDiscovery against the stand-in Kubernetes API server (tests/support/kube_api.py: real HTTP on
127.0.0.1 with list/watch semantics), including the watch faults: a silent stall, events cut into pieces,
429 with Retry-After. Changes are awaited through `pool.on_changed`, never by sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.kube_api import PODS, POOLS, KubeApi, make_pod, make_pool

from epp.config import ConfigError, KubernetesConfig
from epp.datalayer.discovery.kubeapi import Backoff, KubeClient
from epp.datalayer.discovery.kubernetes import (
    ENGINE_LABEL,
    InferencePoolDiscovery,
    endpoint_address,
    parse_pool_spec,
    pod_is_endpoint,
)
from epp.datalayer.endpoints import EndpointPool

APP = {"app": "llama"}
LOGGER = "epp.datalayer.discovery.kubernetes"
API_LOGGER = "epp.datalayer.discovery.kubeapi"
TIMEOUT = 30.0  # hang guard for awaited events, never a timing assertion


class Changes:
    """Waits for the pool to reach a state, woken by its change listener."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.event = asyncio.Event()
        pool.on_changed(self.event.set)

    def addresses(self) -> set[str]:
        return {e.address for e in self.pool}

    async def until(self, predicate: Callable[[set[str]], bool]) -> None:
        async def wait() -> None:
            while not predicate(self.addresses()):
                self.event.clear()
                await self.event.wait()

        await asyncio.wait_for(wait(), TIMEOUT)

    async def equals(self, *addresses: str) -> None:
        await self.until(lambda have: have == set(addresses))


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    server = KubeApi(bookmark_interval_s=0.05)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("test-token\n")
    return path


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.02, cap_s=0.1, jitter=0.0)


@pytest.fixture
async def follow(api: KubeApi, token_file: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await follow()` → (discovery, pool, Changes), following pool "llama" on the stand-in.
    Keyword arguments go to the KubeClient (e.g. watch_timeout_s)."""
    started: list[tuple[InferencePoolDiscovery, KubeClient]] = []

    async def make(**kwargs: Any) -> tuple[InferencePoolDiscovery, EndpointPool, Changes]:
        config = KubernetesConfig(
            inference_pool="llama",
            namespace="default",
            api_server=api.url,
            token_file=token_file,
            ca_file=None,
        )
        pool = EndpointPool()
        changes = Changes(pool)
        client = KubeClient(config, **({"token_refresh_s": 0.05} | kwargs))
        discovery = InferencePoolDiscovery(pool, client, "llama", backoff=fast_backoff())
        await discovery.start()
        started.append((discovery, client))
        return discovery, pool, changes

    yield make
    for discovery, client in started:
        await discovery.stop()
        await client.close()


async def synced(discovery: InferencePoolDiscovery) -> None:
    await asyncio.wait_for(discovery.synced.wait(), TIMEOUT)


async def requests(api: KubeApi, verb: str, resource: str, at_least: int) -> None:
    await asyncio.wait_for(api.wait_requests(lambda _: api.count(verb, resource) >= at_least), TIMEOUT)


def set_ready(ready: bool) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        for condition in pod["status"]["conditions"]:
            if condition["type"] == "Ready":
                condition["status"] = "True" if ready else "False"

    return change


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING and text in r.message
    ]


# -- initial sync ---------------------------------------------------------------------------------------


async def test_initial_sync_keeps_ready_pods_times_target_ports(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000, 8001]))
    api.put_pool(make_pool("other", {"app": "other"}, [9000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP | {ENGINE_LABEL: "sglang"}))
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    api.put_pod(make_pod("v6", "fd00::7", APP))
    api.put_pod(make_pod("weird-1", "10.0.0.3", APP | {ENGINE_LABEL: "tgi"}))
    api.put_pod(make_pod("weird-2", "10.0.0.4", APP | {ENGINE_LABEL: "tgi"}))
    api.put_pod(make_pod("not-ready", "10.0.0.5", APP, ready=False))
    api.put_pod(make_pod("terminating", "10.0.0.6", APP, deleting=True))
    api.put_pod(make_pod("pending", None, APP))
    api.put_pod(make_pod("elsewhere", "10.0.0.8", {"app": "other"}))
    api.put_pod(make_pod("other-ns", "10.0.0.9", APP, namespace="team-b"))

    discovery, pool, _ = await follow()
    await synced(discovery)

    engines = {e.address: e.engine for e in pool}
    assert engines == {
        "10.0.0.1:8000": "sglang", "10.0.0.1:8001": "sglang",
        "10.0.0.2:8000": "vllm", "10.0.0.2:8001": "vllm",
        "[fd00::7]:8000": "vllm", "[fd00::7]:8001": "vllm",
        "10.0.0.3:8000": "vllm", "10.0.0.3:8001": "vllm",
        "10.0.0.4:8000": "vllm", "10.0.0.4:8001": "vllm",
    }  # fmt: skip
    assert pool.synced
    assert len(errors(caplog, "'tgi' is not a known engine")) == 1
    list_query = next(q for verb, resource, q in api.requests if (verb, resource) == ("list", PODS))
    assert list_query["labelSelector"] == "app=llama"


async def test_empty_pool_is_synced_with_no_endpoints(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    discovery, pool, _ = await follow()
    await synced(discovery)
    assert len(pool) == 0 and pool.synced


# -- following pod changes ------------------------------------------------------------------------------


async def test_pod_changes_update_the_pool_and_keep_known_endpoints(
    api: KubeApi, follow: Callable[..., Any]
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    discovery, pool, changes = await follow()
    await synced(discovery)
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    kept = pool.get("10.0.0.1:8000")
    assert kept is not None
    kept.acquire(100)

    api.update_pod("b", set_ready(False))
    await changes.equals("10.0.0.1:8000")

    api.put_pod(make_pod("c", "10.0.0.3", APP))
    await changes.equals("10.0.0.1:8000", "10.0.0.3:8000")

    def move(pod: dict[str, Any]) -> None:
        pod["status"]["podIP"] = "10.0.0.33"

    api.update_pod("c", move)
    await changes.equals("10.0.0.1:8000", "10.0.0.33:8000")

    api.update_pod("b", set_ready(True))
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.33:8000")

    api.update_pod("c", lambda pod: pod["metadata"].update(deletionTimestamp="2025-01-01T00:00:00Z"))
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    api.delete_pod("c")
    api.delete_pod("b")
    await changes.equals("10.0.0.1:8000")

    assert pool.get("10.0.0.1:8000") is kept and kept.inflight_requests == 1
    assert api.count("list", PODS) == 1  # all of it through the one watch


async def test_pod_relabelled_out_of_the_selector_leaves(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    discovery, pool, changes = await follow()
    await synced(discovery)

    api.update_pod("b", lambda pod: pod["metadata"]["labels"].update(app="retired"))
    await changes.equals("10.0.0.1:8000")
    api.update_pod("b", lambda pod: pod["metadata"]["labels"].update(app="llama", **{ENGINE_LABEL: "sglang"}))
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    assert {e.address: e.engine for e in pool}["10.0.0.2:8000"] == "sglang"


async def test_engine_label_change_updates_the_endpoint(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, pool, _ = await follow()
    await synced(discovery)
    endpoint = pool.get("10.0.0.1:8000")
    changed = asyncio.Event()
    pool.on_changed(changed.set)
    api.update_pod("a", lambda pod: pod["metadata"]["labels"].update({ENGINE_LABEL: "trtllm-serve"}))
    await asyncio.wait_for(changed.wait(), TIMEOUT)
    assert (
        pool.get("10.0.0.1:8000") is endpoint and endpoint is not None and endpoint.engine == "trtllm-serve"
    )


async def test_normal_end_of_watch_resumes_without_listing_again(
    api: KubeApi, follow: Callable[..., Any]
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow()
    await synced(discovery)
    await requests(api, "watch", PODS, 1)

    api.close_watches()  # like the server's timeoutSeconds
    await requests(api, "watch", PODS, 2)
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    assert api.count("list", PODS) == 1
    resumed = [q for verb, resource, q in api.requests if (verb, resource) == ("watch", PODS)][1]
    assert resumed["resourceVersion"] != "0" and resumed["allowWatchBookmarks"] == "true"


# -- recovery -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_expired_resource_version_relists(
    api: KubeApi, follow: Callable[..., Any], gone_as_http: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    api.gone_as_http = gone_as_http
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow()
    await synced(discovery)
    await requests(api, "watch", PODS, 1)

    # A change the open watch never delivers, then compaction: resuming from the old version gets 410.
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    api.compact()
    api.close_watches(drop_pending=True)
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    assert api.count("list", PODS) == 2
    assert any("expired" in r.message and "listing again" in r.message for r in caplog.records)
    assert not errors(caplog, "")  # an expected event, not a problem


async def test_connection_loss_relists_and_keeps_endpoints_meanwhile(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.put_pod(make_pod("b", "10.0.0.2", APP))
    caplog.set_level(logging.INFO, logger=LOGGER)
    discovery, _, changes = await follow()
    await synced(discovery)
    await requests(api, "watch", PODS, 1)

    api.delete_pod("b")
    api.close_watches(abort=True, drop_pending=True)  # TCP cut: the deletion was never sent
    await changes.equals("10.0.0.1:8000")
    assert api.count("list", PODS) == 2
    assert errors(caplog, "lost the API server")
    assert any("recovered after: connection" in r.message for r in caplog.records)


async def test_api_server_down_at_start_then_up(token_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = KubeApi()
    await api.start()
    port = api.port
    await api.stop()  # nothing listens there now
    config = KubernetesConfig(inference_pool="llama", namespace="default", api_server=api.url,
                              token_file=token_file, ca_file=None)  # fmt: skip
    pool = EndpointPool()
    changes = Changes(pool)
    client = KubeClient(config)
    discovery = InferencePoolDiscovery(pool, client, "llama", backoff=fast_backoff())
    with logged("lost the API server") as refused:
        await discovery.start()
        try:
            await asyncio.wait_for(refused.wait(), TIMEOUT)
            assert not discovery.synced.is_set()
            api = KubeApi()
            api.put_pool(make_pool("llama", APP, [8000]))
            api.put_pod(make_pod("a", "10.0.0.1", APP))
            await api.start(port)
            await synced(discovery)
            await changes.equals("10.0.0.1:8000")
            assert len(errors(caplog, "lost the API server")) == 1
        finally:
            await discovery.stop()
            await client.close()
            await api.stop()


@contextlib.contextmanager
def logged(text: str) -> Iterator[asyncio.Event]:
    """An event set when the discovery logs a record containing `text`."""
    event = asyncio.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                event.set()

    handler = Handler()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield event
    finally:
        logger.removeHandler(handler)


# -- the InferencePool itself ---------------------------------------------------------------------------


async def test_selector_and_port_changes_take_effect(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.put_pod(make_pod("blue", "10.0.1.1", {"app": "llama-blue"}))
    api.put_pod(make_pod("blue-2", "10.0.1.2", {"app": "llama-blue"}))
    discovery, _, changes = await follow()
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")

    api.put_pool(make_pool("llama", {"app": "llama-blue"}, [8000]))
    await changes.equals("10.0.1.1:8000", "10.0.1.2:8000")
    api.put_pool(make_pool("llama", {"app": "llama-blue"}, [8000, 8002]))
    await changes.equals("10.0.1.1:8000", "10.0.1.1:8002", "10.0.1.2:8000", "10.0.1.2:8002")
    # Later pods of the new selector arrive through the new watch.
    api.put_pod(make_pod("blue-3", "10.0.1.3", {"app": "llama-blue"}))
    await changes.until(lambda have: "10.0.1.3:8002" in have)


async def test_pool_status_updates_do_not_relist(api: KubeApi, follow: Callable[..., Any]) -> None:
    pool_object = make_pool("llama", APP, [8000])
    api.put_pool(pool_object)
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow()
    await synced(discovery)
    await requests(api, "watch", POOLS, 1)
    api.put_pool(pool_object | {"status": {"parents": [{"parentRef": {"name": "gw"}}]}})
    api.put_pod(make_pod("b", "10.0.0.2", APP))  # observed after the pool's status event
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    assert api.count("list", PODS) == 1


async def test_missing_pool_is_logged_once_and_retried(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow()
    await requests(api, "list", POOLS, 4)
    assert not discovery.synced.is_set()
    assert len(errors(caplog, "InferencePool default/llama: not found")) == 1

    api.put_pool(make_pool("llama", APP, [8000]))
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")


async def test_deleted_pool_empties_the_endpoints(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow()
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")

    api.delete_pool("llama")
    await changes.equals()
    assert errors(caplog, "not found")
    api.put_pool(make_pool("llama", APP, [8000]))
    await changes.equals("10.0.0.1:8000")


async def test_invalid_pool_spec_is_reported(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, []))
    discovery, _, _ = await follow()
    await requests(api, "list", POOLS, 3)
    assert not discovery.synced.is_set()
    assert len(errors(caplog, "invalid spec: spec.targetPorts is empty")) == 1


# -- auth -----------------------------------------------------------------------------------------------


async def test_rejected_token_is_logged_once_then_a_rotated_token_is_used(
    api: KubeApi, follow: Callable[..., Any], token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    token_file.write_text("expired-token")
    discovery, _, changes = await follow()
    await requests(api, "list", POOLS, 4)
    assert not discovery.synced.is_set()
    [record] = errors(caplog, "401 Unauthorized")
    assert str(token_file) in record.message and record.levelno == logging.ERROR

    token_file.write_text("test-token")  # the kubelet rotated the projected token
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")


async def test_forbidden_names_the_missing_permission(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.forbid(PODS, "list")
    discovery, _, changes = await follow()
    await requests(api, "list", PODS, 3)
    [record] = errors(caplog, "403 Forbidden to list pods in namespace default")
    assert "deploy/base/rbac.yaml" in record.message and 'cannot list resource "pods"' in record.message

    api.allow(PODS, "list")
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")


async def test_requests_carry_the_bearer_token(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    discovery, _, _ = await follow()
    await synced(discovery)  # the stand-in answers 401 to anything else


# -- configuration and pure helpers ---------------------------------------------------------------------


async def test_in_cluster_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("serving\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")  # nothing listens: the loop just retries
    config = KubernetesConfig(inference_pool="llama", namespace_file=namespace_file, ca_file=None,
                              token_file=tmp_path / "absent")  # fmt: skip
    client = KubeClient(config)
    discovery = InferencePoolDiscovery(EndpointPool(), client, "llama")
    await discovery.start()
    await discovery.stop()
    await client.close()
    assert (client.namespace, client.api_server) == ("serving", "https://127.0.0.1:1")


async def test_out_of_cluster_without_settings_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = KubernetesConfig(inference_pool="llama", namespace_file=tmp_path / "absent")
    with pytest.raises(ConfigError, match="namespace is not set"):
        await KubeClient(config).open()
    config = KubernetesConfig(inference_pool="llama", namespace="default")
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        await KubeClient(config).open()
    config = KubernetesConfig(inference_pool="llama", namespace="default", api_server="https://127.0.0.1:1",
                              ca_file=tmp_path / "no-ca.crt")  # fmt: skip
    with pytest.raises(ConfigError, match="ca_file"):
        await KubeClient(config).open()


def test_parse_pool_spec() -> None:
    spec = parse_pool_spec(make_pool("p", {"b": "2", "a": "1"}, [8000, 8001, 8000]))
    assert spec.label_selector == "a=1,b=2" and spec.target_ports == (8000, 8001)
    with pytest.raises(ValueError, match="matchLabels is empty"):
        parse_pool_spec(make_pool("p", {}, [8000]))
    with pytest.raises(ValueError, match=r"targetPorts\[0\].number"):
        parse_pool_spec(make_pool("p", {"a": "1"}, [0]))


def test_pod_is_endpoint() -> None:
    assert pod_is_endpoint(make_pod("a", "10.0.0.1", APP))
    assert not pod_is_endpoint(make_pod("a", "10.0.0.1", APP, ready=False))
    assert not pod_is_endpoint(make_pod("a", "10.0.0.1", APP, deleting=True))
    assert not pod_is_endpoint(make_pod("a", None, APP))
    assert not pod_is_endpoint({"metadata": {"name": "bare"}})
    assert endpoint_address("fd00::1", 8000) == "[fd00::1]:8000"
    assert endpoint_address("10.0.0.1", 8000) == "10.0.0.1:8000"


# -- watch liveness: stalls, split events, throttling ----------------------------------------------------


async def test_a_silent_watch_is_dropped_and_resumed_without_listing_again(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    discovery, _, changes = await follow(watch_timeout_s=1, watch_grace_s=0.3)
    await synced(discovery)
    await requests(api, "watch", PODS, 1)
    watches_before = api.count("watch", PODS)

    api.stall_watches()  # no more bytes, no end of stream, no FIN: only the client's deadline can tell
    api.put_pod(make_pod("b", "10.0.0.2", APP))  # never sent on the stalled watch
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")  # resumed from its resourceVersion: replayed
    assert api.count("watch", PODS) > watches_before
    assert api.count("list", PODS) == 1
    assert any(r.name == API_LOGGER and "stalled" in r.getMessage() for r in caplog.records)
    assert discovery._client.stalls >= 1


async def test_events_cut_into_small_chunks_are_reassembled(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.split_events = 7  # every event (list results are whole) arrives in 7-byte pieces
    api.put_pool(make_pool("llama", APP, [8000]))
    discovery, _, changes = await follow()
    await synced(discovery)
    await requests(api, "watch", PODS, 1)
    big = make_pod("b", "10.0.0.2", APP)
    big["metadata"]["annotations"] = {"note": "x" * 70_000}  # larger than one read
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.put_pod(big)
    await changes.equals("10.0.0.1:8000", "10.0.0.2:8000")
    api.delete_pod("a")
    await changes.equals("10.0.0.2:8000")
    assert api.count("list", PODS) == 1


async def test_429_is_retried_after_retry_after(
    api: KubeApi, follow: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    api.put_pod(make_pod("a", "10.0.0.1", APP))
    api.throttle(count=2, retry_after=1)
    discovery, _, changes = await follow()
    await synced(discovery)
    await changes.equals("10.0.0.1:8000")
    [record] = errors(caplog, "429 Too Many Requests")
    assert "retrying after 1 s (Retry-After)" in record.message and record.levelno == logging.WARNING


async def test_api_connections_use_tcp_keepalive(api: KubeApi, follow: Callable[..., Any]) -> None:
    api.put_pool(make_pool("llama", APP, [8000]))
    discovery, _, _ = await follow()
    await synced(discovery)
    client = discovery._client
    assert client.session.connector._socket_factory == client.keepalive.socket_factory
