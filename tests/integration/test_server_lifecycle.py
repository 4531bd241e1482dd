"""The picker process around the request path: health names, Prometheus metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.envoy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


async def _health(port: int) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        out = {}
        for name in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            out[name] = (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
        return out


async def test_health_names_serve_until_shutdown(upstreams, stack) -> None:
    ups = await upstreams(1)
    server, _ = await stack([ups[0].address])
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(server.ports.health) == dict.fromkeys(
        ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"), serving
    )
    await server._set_ready(False)
    status = await _health(server.ports.health)
    assert status["liveness"] == serving and status["readiness"] != serving


async def test_prometheus_metrics_use_gie_names(upstreams, stack) -> None:
    ups = await upstreams(2)
    ups[0].metrics.waiting, ups[1].metrics.waiting = 2, 4
    ups[0].metrics.kv_usage, ups[1].metrics.kv_usage = 0.2, 0.4
    server, envoy = await stack([u.address for u in ups], objectives=[{"name": "batch", "priority": -1}])
    await server.scraper.scrape_all()
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, {"model": "m"}):
            async with session.post(envoy.url + "/v1/chat/completions", json=body) as response:
                await response.read()
        async with session.get(f"http://127.0.0.1:{server.ports.metrics}/metrics") as response:
            text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)

    def value(metric: str, **labels: str) -> float:
        return sum(s.value for s in samples[metric] if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("inference_objective_request_total", model_name="m", target_model_name="m") == 1
    assert value("inference_objective_request_error_total", error_code="bad_request") == 1
    assert value("inference_objective_request_duration_seconds_count", model_name="m") == 1
    assert value("inference_objective_running_requests", model_name="m") == 0
    assert value("inference_pool_average_queue_size", name="default-pool") == pytest.approx(3)
    assert value("inference_pool_average_kv_cache_utilization") == pytest.approx(0.3)
    assert value("inference_pool_ready_pods") == 2
    assert value("inference_pool_per_pod_queue_size", model_server_pod=ups[1].address) == 4
    assert value("inference_extension_scheduler_e2e_duration_seconds_count") == 1
    assert value("inference_extension_plugin_duration_seconds_count", plugin_name="prefix-cache") == 1
    assert "inference_extension_prefix_indexer_size" in samples


async def _until_not_ready(port: int) -> None:
    """Follow readiness with the health service's Watch stream until it reports NOT_SERVING (an event)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async for update in stub.Watch(health_pb2.HealthCheckRequest(service="readiness")):
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return


async def _until_new_streams_are_refused(port: int) -> None:
    """Open ext_proc streams until the picker refuses one (shutdown has closed the door)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        while True:
            call = stub.Process()
            try:
                await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=True)))
                await call.done_writing()
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError:
                return


async def test_graceful_shutdown_lets_an_inflight_stream_finish(upstreams, stack) -> None:
    ups = await upstreams(1, sse_events=3)
    server, envoy = await stack([ups[0].address])
    release = ups[0].gate = asyncio.Event()  # the model server holds its answer until released
    ups[0].hits.clear()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.post(envoy.url + "/v1/chat/completions", json={**CHAT, "stream": True})
        )
        await ups[0].hits.wait()  # the request went through the picker and reached the model server
        assert server.servicer.active_streams == 1
        stopping = asyncio.ensure_future(server.stop())
        async with asyncio.timeout(60):  # hang guard only
            await _until_not_ready(server.ports.health)
            await _until_new_streams_are_refused(server.ports.extproc)
        # Shutdown has begun (not ready, new streams refused); the in-flight stream survives it.
        assert not stopping.done() and not pending.done()
        assert server.servicer.active_streams == 1
        release.set()
        response = await pending
        text = await response.text()
        await stopping
    assert response.status == 200 and text.endswith("data: [DONE]\n\n")
    assert json.loads(text.split("\n\n")[0].removeprefix("data: "))["upstream"] == ups[0].address
