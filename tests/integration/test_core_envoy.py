"""The picker's spine through the real Envoy binary, against small real HTTP upstreams."""

from __future__ import annotations

import json

import aiohttp
import pytest
from support.gateway import subset_from_header

pytestmark = pytest.mark.envoy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}

SUBSET_FROM_HEADER = subset_from_header("x-test-subset")


async def post(url: str, body, path: str = "/v1/chat/completions", headers=None) -> tuple[int, dict, str]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with aiohttp.ClientSession() as session, session.post(url + path, data=data, headers=headers) as r:
        text = await r.text()
        return r.status, dict(r.headers), text


@pytest.mark.parametrize("shape", ["gateway", "buffered", "override-host"])
async def test_request_lands_on_the_endpoint_the_picker_chose(upstreams, stack, shape) -> None:
    ups = await upstreams(3)
    server, envoy = await stack([u.address for u in ups], shape=shape)
    for _ in range(6):
        status, _, text = await post(envoy.url, CHAT)
        assert status == 200, text
        info = json.loads(text)
        # The upstream that served it is the one the picker put in the destination header.
        assert info["upstream"] == info["destination"]
    assert sum(len(u.requests) for u in ups) == 6
    assert all(e.inflight_requests == 0 for e in server.pool)


@pytest.mark.parametrize("shape", ["gateway", "buffered"])
async def test_sse_stream_arrives_intact_and_in_order(upstreams, stack, shape) -> None:
    ups = await upstreams(2, sse_events=50)
    _, envoy = await stack([u.address for u in ups], shape=shape)
    status, headers, text = await post(envoy.url, {**CHAT, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e.removeprefix("data: "))["index"] for e in events[:-1]] == list(range(50))


async def test_one_mib_prompt_in_full_duplex_mode(upstreams, stack) -> None:
    ups = await upstreams(2)
    _, envoy = await stack([u.address for u in ups])
    body = {"model": "m", "prompt": "y" * (1 << 20)}
    status, _, text = await post(envoy.url, body, "/v1/completions")
    assert status == 200, text
    served = next(u for u in ups if u.requests)
    assert served.requests[0]["body"] == json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "path", "status", "code"),
    [
        ("{broken", "/v1/chat/completions", 400, "bad_request"),
        ({"messages": [{"role": "user", "content": "x"}]}, "/v1/chat/completions", 400, "model_required"),
        ({"model": "gpt-unknown", "prompt": "x"}, "/v1/completions", 404, "model_not_found"),
        ({"model": "m", "prompt": "z" * 5000}, "/v1/completions", 413, "body_too_large"),
    ],
)
async def test_errors_reach_the_client_with_status_and_reason(
    upstreams, stack, body, path, status, code
) -> None:
    ups = await upstreams(1)
    _, envoy = await stack([ups[0].address], models=[{"name": "m"}], limits={"max_body_bytes": 4096})
    got, headers, text = await post(envoy.url, body, path)
    assert got == status
    error = json.loads(text)["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert headers["x-epp-reject-reason"] == code
    assert ups[0].requests == []  # nothing reached the model server


async def test_no_endpoint_is_503(upstreams, stack) -> None:
    ups = await upstreams(2)
    _, envoy = await stack([u.address for u in ups], extra_http_filters=[SUBSET_FROM_HEADER])
    status, _, text = await post(envoy.url, CHAT, headers={"x-test-subset": "127.0.0.1:1"})
    assert status == 503
    assert json.loads(text)["error"]["code"] == "subset_empty"


async def test_spoofed_destination_header_is_ignored(upstreams, stack) -> None:
    pool, outsider = await upstreams(2)
    _, envoy = await stack([pool.address])
    for _ in range(3):
        status, _, text = await post(
            envoy.url, CHAT, headers={"x-gateway-destination-endpoint": outsider.address}
        )
        assert status == 200 and json.loads(text)["upstream"] == pool.address
    assert outsider.requests == []


async def test_subset_hint_narrows_the_choice(upstreams, stack) -> None:
    ups = await upstreams(3)
    _, envoy = await stack([u.address for u in ups], extra_http_filters=[SUBSET_FROM_HEADER])
    for _ in range(6):
        status, _, text = await post(
            envoy.url, CHAT, headers={"x-test-subset": f"{ups[1].address},127.0.0.1:9"}
        )
        assert status == 200 and json.loads(text)["upstream"] == ups[1].address
    assert ups[0].requests == [] and ups[2].requests == []


@pytest.mark.parametrize("shape", ["gateway", "buffered"])
async def test_model_rewrite_reaches_the_upstream(upstreams, stack, shape) -> None:
    ups = await upstreams(1)
    _, envoy = await stack(
        [ups[0].address], shape=shape, models=[{"name": "chat", "targets": [{"model": "llama-3-8b-v2"}]}]
    )
    status, _, text = await post(
        envoy.url, {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 200, text
    seen = ups[0].requests[0]
    assert json.loads(seen["body"])["model"] == "llama-3-8b-v2"
    # Envoy may re-frame a streamed body (chunked); what must never happen is a stale content-length.
    length = seen["headers"].get("Content-Length")
    assert length is None or int(length) == len(seen["body"]), seen["headers"]
    assert length is not None or seen["headers"].get("Transfer-Encoding") == "chunked", seen["headers"]


async def test_override_host_retries_down_the_fallback_list(upstreams, stack) -> None:
    broken, healthy = await upstreams(2)
    broken.status = 503
    healthy.metrics.waiting = 3  # the picker prefers the broken one first (shorter queue)
    server, envoy = await stack(
        [broken.address, healthy.address], shape="override-host", limits={"fallback_endpoints": 1}
    )
    await server.scraper.scrape_all()
    status, _, text = await post(envoy.url, CHAT)
    assert status == 200, text
    assert len(broken.requests) == 1 and json.loads(text)["upstream"] == healthy.address


async def test_tls_between_envoy_and_picker(upstreams, stack) -> None:
    ups = await upstreams(1)
    _, envoy = await stack([ups[0].address], tls=True)
    status, _, _ = await post(envoy.url, CHAT)
    assert status == 200
