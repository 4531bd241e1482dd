"""Flow control through the real Envoy: held requests are served by priority and fairly between tenants,
expire with 503, overflow with 429, leave no trace when the client goes away, and get a clear 503 when the
picker shuts down.

The tests drive saturation through the upstreams' /metrics pages. Background scraping is switched off (a
scrape interval of days), so the picker sees exactly what each `scrape_all()` showed, plus its own
dispatches since (each counts as one request waiting, as does each of its requests not started yet): with
one endpoint and the gate's queue_threshold set to 10, `waiting = 9` leaves room for exactly one more
request (while fewer than 10 of the test's requests are held at the upstream). A scrape showing room is
followed by `flow.kick()`, which is what the picker's periodic check does after a real scrape. Responses
are held (`Upstream.gate`) while the order is observed, so no first byte frees capacity behind the test's
back. Nothing is timed: every wait is for an event or a condition, under a hang guard that fails with a
message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.envoy

OBJECTIVES = [
    {"name": "critical", "priority": 10},
    {"name": "standard", "priority": 0},
    {"name": "batch", "priority": -1},
]
FROZEN_SCRAPES = {"seed": 11, "scrape": {"interval_s": 1e6}}  # only the tests' scrape_all() scrapes
HANG_GUARD_S = 60.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail with `what` if it never does (a hang guard, not a timing)."""
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"gave up waiting: {what}") from None


class Client:
    """Requests through Envoy, each in its own task; `tag` goes into the prompt, so the upstream's record
    says which request it is."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S))

    def send(self, tag: str, objective: str = "standard", tenant: str | None = None) -> asyncio.Task:
        headers = {"x-llm-d-inference-objective": objective}
        if tenant is not None:
            headers["x-llm-d-inference-fairness-id"] = tenant
        body = {"model": "m", "messages": [{"role": "user", "content": f"request {tag}"}]}
        return asyncio.ensure_future(self._post(body, headers))

    async def _post(self, body: dict, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
        async with self.session.post(self.url + "/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.text()

    async def close(self) -> None:
        await self.session.close()


def tags(upstream: Any) -> list[str]:
    """The requests an upstream received, in arrival order, by tag."""
    out = []
    for record in upstream.requests:
        content = json.loads(record["body"])["messages"][0]["content"]
        out.append(content.removeprefix("request "))
    return out


async def saturate(server: Any, upstream: Any, waiting: float) -> None:
    upstream.metrics.waiting = waiting
    assert await server.scraper.scrape_all() == 1


async def release_one_by_one(server: Any, upstream: Any, count: int) -> None:
    """Make room for one request at a time; each must reach the upstream before the next is let go."""
    for n in range(count):
        await saturate(server, upstream, 9)  # room for exactly one more
        server.director.flow.kick()
        await until(lambda n=n: len(upstream.requests) == n + 1, f"request {n + 1} to reach the upstream")


async def idle(server: Any) -> None:
    await until(
        lambda: server.servicer.active_streams == 0 and all(e.inflight_requests == 0 for e in server.pool),
        "streams and in-flight counts to return to zero",
    )
    assert server.director.flow.size == 0 and server.director.flow.bytes == 0


def assert_dropped(response: tuple[int, dict[str, str], str], status: int, code: str) -> None:
    got, headers, text = response
    assert got == status, text
    assert headers["x-epp-reject-reason"] == code
    assert headers["x-llm-d-request-dropped-reason"] == code
    error = json.loads(text)["error"]
    assert error["code"] == code and error["message"]


async def start(stack: Any, upstreams: Any, shape: str = "gateway", **flow: Any) -> tuple[Any, Any, Client]:
    [up] = await upstreams(1)
    up.gate = asyncio.Event()  # responses wait until the test releases them
    server, envoy = await stack(
        [up.address], shape=shape, objectives=OBJECTIVES, scheduling=FROZEN_SCRAPES,
        flow_control={"enabled": True, "queue_threshold": 10, **flow},
    )  # fmt: skip
    await saturate(server, up, 50)
    return server, up, Client(envoy.url)


@pytest.mark.parametrize("shape", ["gateway", "buffered"])
async def test_held_requests_are_dispatched_by_priority(stack, upstreams, shape) -> None:
    server, up, client = await start(stack, upstreams, shape)
    flow = server.director.flow
    arrivals = [("s0", "standard"), ("s1", "standard"), ("c0", "critical"), ("s2", "standard"),
                ("c1", "critical"), ("c2", "critical")]  # fmt: skip
    tasks = []
    for n, (tag, objective) in enumerate(arrivals):
        tasks.append(client.send(tag, objective))
        await until(lambda n=n: flow.size == n + 1, f"{tag} to be queued")
    # The queue shows on /metrics per band.
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
        async with session.get(url) as response:
            text = await response.text()
    assert 'inference_extension_flow_control_queue_size{fairness_id="default-flow",' in text
    assert 'priority="10"' in text and 'priority="0"' in text
    await release_one_by_one(server, up, len(arrivals))
    assert tags(up) == ["c0", "c1", "c2", "s0", "s1", "s2"]
    up.gate.set()
    for response in await asyncio.gather(*tasks):
        assert response[0] == 200, response
    await client.close()
    await idle(server)


async def test_a_flooding_tenant_does_not_starve_a_light_one(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams)
    flow = server.director.flow
    tasks = [client.send(f"flood{i}", tenant="flood") for i in range(8)]
    await until(lambda: flow.size == 8, "the flood to be queued")
    tasks += [client.send(f"light{i}", tenant="light") for i in range(2)]
    await until(lambda: flow.size == 10, "the light tenant's requests to be queued")
    await release_one_by_one(server, up, 5)
    # Round-robin between the two flows: the light tenant waits for one flood request, not eight.
    assert tags(up) == ["flood0", "light0", "flood1", "light1", "flood2"]
    await saturate(server, up, 0)
    flow.kick()
    up.gate.set()
    assert [r[0] for r in await asyncio.gather(*tasks)] == [200] * 10
    await client.close()
    await idle(server)


async def test_ttl_expiry_is_503_with_the_reason(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams, ttl_s=1.0, no_endpoints_ttl_s=1.0)
    assert_dropped(await client.send("late"), 503, "queue_timeout")
    assert up.requests == []
    await client.close()
    await idle(server)


async def test_a_full_queue_is_429_with_the_reason(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams, max_requests=2, band_max_requests=None)
    flow = server.director.flow
    held = [client.send("a"), client.send("b")]
    await until(lambda: flow.size == 2, "two requests to be queued")
    overflow = await client.send("c")
    assert_dropped(overflow, 429, "queue_full")
    assert "flow_control.max_requests" in json.loads(overflow[2])["error"]["message"]
    await saturate(server, up, 0)
    flow.kick()
    up.gate.set()
    assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
    assert sorted(tags(up)) == ["a", "b"]
    await client.close()
    await idle(server)


async def test_a_sheddable_request_is_429_while_saturated(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams)
    assert_dropped(await client.send("batch", "batch"), 429, "saturated_shed")
    assert server.director.flow.size == 0 and up.requests == []
    await client.close()
    await idle(server)


async def test_a_client_gone_while_queued_frees_its_slot(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams)
    flow = server.director.flow
    task = client.send("gone")
    await until(lambda: flow.size == 1, "the request to be queued")
    task.cancel()
    await client.close()  # the client's connection closes: Envoy resets the ext_proc stream
    await until(lambda: flow.size == 0, "the queue slot to be freed")
    await idle(server)
    await saturate(server, up, 0)
    flow.kick()
    assert up.requests == []  # nothing was sent on behalf of the vanished client
    up.gate.set()


async def test_shutdown_answers_every_queued_request_with_503(stack, upstreams) -> None:
    server, up, client = await start(stack, upstreams)
    flow = server.director.flow
    tasks = [client.send(f"r{i}", objective) for i, objective in enumerate(["standard", "critical"] * 2)]
    await until(lambda: flow.size == 4, "four requests to be queued")
    await server.stop()
    for response in await asyncio.gather(*tasks):
        assert_dropped(response, 503, "shutting_down")
    assert flow.size == 0 and server.servicer.active_streams == 0 and up.requests == []
    up.gate.set()
    await client.close()


async def test_no_endpoints_holds_requests_until_one_appears(stack, upstreams) -> None:
    from epp.datalayer.endpoints import Endpoint

    [up] = await upstreams(1)
    server, envoy = await stack([], scheduling=FROZEN_SCRAPES, flow_control={"enabled": True})
    client = Client(envoy.url)
    task = client.send("waits")
    await until(lambda: server.director.flow.size == 1, "the request to be held")
    server.pool.replace([Endpoint(up.address)])  # scaled up from zero
    await server.scraper.scrape_all()
    server.director.flow.kick()
    status, _, text = await task
    assert status == 200 and json.loads(text)["upstream"] == up.address
    await client.close()
    await idle(server)


async def test_no_endpoints_ttl_is_503_no_endpoints(stack, upstreams) -> None:
    server, envoy = await stack(
        [], scheduling=FROZEN_SCRAPES, flow_control={"enabled": True, "no_endpoints_ttl_s": 0.5}
    )
    client = Client(envoy.url)
    assert_dropped(await client.send("nobody"), 503, "no_endpoints")
    await client.close()
    await idle(server)


async def test_explain_says_whether_a_request_would_be_queued(stack, upstreams) -> None:
    import grpc

    from epp._generated import epp_admin_pb2 as pb
    from epp._generated import epp_admin_pb2_grpc as pb_grpc
    from epp.admin.client import format_explain

    server, up, client = await start(stack, upstreams)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.admin}") as channel:
        stub = pb_grpc.AdminStub(channel)
        held = await stub.Explain(pb.ExplainRequest(path="/v1/chat/completions", body=body))
        assert (held.status, held.flow_control) == (200, "queue")
        threshold = server.config.flow_control.queue_threshold
        assert "saturated" in held.flow_reason and held.gate_saturation == pytest.approx(50 / threshold)
        assert "queued by flow control" in format_explain(held)
        batch = {"x-llm-d-inference-objective": "batch"}
        shed = await stub.Explain(pb.ExplainRequest(path="/v1/chat/completions", body=body, headers=batch))
        assert (shed.status, shed.error_code, shed.flow_control) == (429, "saturated_shed", "reject")
        await saturate(server, up, 0)
        now = await stub.Explain(pb.ExplainRequest(path="/v1/chat/completions", body=body))
        assert (now.flow_control, now.destination) == ("dispatch", up.address)
    assert server.director.flow.size == 0
    await client.close()
