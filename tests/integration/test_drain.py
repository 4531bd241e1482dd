"""Graceful drain through real Envoy: after SIGTERM's shutdown begins, readiness is NOT_SERVING at once, new
requests are still served for the drain window, then new ext_proc streams are refused while the request in
flight finishes. Every step waits for an event (the server's, the health Watch stream's, the upstream's);
the drain window is ended by a second stop request (what a second SIGTERM/SIGINT does), not by a clock."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.envoy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
GUARD = 60.0  # hang guard only


async def until_status(port: int, name: str, wanted: int) -> None:
    """Follow `name` with the health service's Watch stream until it reports `wanted`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async for update in stub.Watch(health_pb2.HealthCheckRequest(service=name)):
            if update.status == wanted:
                return


async def extproc_stream_refused(port: int) -> bool:
    """Open one ext_proc stream with a bodyless request; True if the picker refused it."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        try:
            await call.write(pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=True)))
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            return True
        return False


async def test_sigterm_drains_then_refuses_new_streams_and_finishes_the_inflight_one(
    upstreams, stack, capsys: pytest.CaptureFixture[str]
) -> None:
    ups = await upstreams(1, sse_events=3)
    server, envoy = await stack([ups[0].address], server={"drain_s": 3600, "grace_period_s": 60})
    release = ups[0].gate = asyncio.Event()  # the model server holds its answer until released
    ups[0].hits.clear()
    async with aiohttp.ClientSession() as session, asyncio.timeout(GUARD):
        inflight = asyncio.ensure_future(
            session.post(envoy.url + "/v1/chat/completions", json={**CHAT, "stream": True})
        )
        await ups[0].hits.wait()  # through the picker, now at the model server
        ups[0].gate = None  # later requests are answered at once

        server.request_stop()  # SIGTERM
        shutting_down = asyncio.ensure_future(server.shutdown())
        began = time.perf_counter()
        await server.draining.wait()
        await until_status(server.ports.health, "readiness", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until_status(
            server.ports.health,
            "envoy.service.ext_proc.v3.ExternalProcessor",
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )

        # The drain window: not ready, but a new request is still routed and served in full.
        async with session.post(envoy.url + "/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
            assert (await response.json())["upstream"] == ups[0].address
        assert not server.accepting_stopped.is_set() and not inflight.done()

        server.request_stop()  # a second signal ends the drain window now
        await server.accepting_stopped.wait()
        drained = time.perf_counter() - began
        while not await extproc_stream_refused(server.ports.extproc):
            await asyncio.sleep(0.05)  # the door closes as the gRPC server begins stopping
        assert not inflight.done() and server.servicer.active_streams >= 1

        release.set()  # the model server answers: the stream in flight finishes within the grace period
        response = await inflight
        text = await response.text()
        await shutting_down
    assert response.status == 200 and text.endswith("data: [DONE]\n\n")
    assert json.loads(text.split("\n\n")[0].removeprefix("data: "))["upstream"] == ups[0].address
    with capsys.disabled():
        print(f"\n[drain] shutdown -> accepting stopped (drain cut by a second signal): {drained:.3f} s")
