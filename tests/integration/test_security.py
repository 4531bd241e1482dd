"""Security through the real Envoy binary: a client can never choose the upstream, control headers follow
`security.trusted_control_headers`, an empty body on an inference path is the picker's 400, ext_proc is TLS by
default, and the limits on streams, buffered bytes and slow bodies hold with real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from epp.config import load_config
from epp.server import Server
from epp_lab.envoy_launcher import Envoy, EnvoyOptions, free_port, render

pytestmark = pytest.mark.envoy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
SHAPES = ["gateway", "buffered", "override-host", "ai-gateway"]


async def send(
    url: str, body: Any = None, path: str = "/v1/chat/completions", headers: Any = None, method: str = "POST"
) -> tuple[int, dict[str, str], str]:
    data = body if body is None or isinstance(body, bytes | str) else json.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url + path, data=data, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.text()


async def until(condition: Any, what: str) -> None:
    """Wait for a condition the test itself brings about (a stream opening in the picker), polling."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def spoofing_headers(outsider: str, other: str) -> list[tuple[str, str]]:
    """Everything a client could try in order to pick the upstream itself (a list: some names twice)."""
    return [
        ("x-gateway-destination-endpoint", outsider),
        ("x-gateway-destination-endpoint", f"{outsider},{other}"),
        ("x-gateway-destination-endpoint-subset", outsider),
        ("x-gateway-destination-endpoint-served", outsider),
        ("x-envoy-original-dst-host", outsider),
        ("envoy.lb", json.dumps({"x-gateway-destination-endpoint": outsider})),
        ("x-llm-d-model-name-rewrite", "not-for-you"),
    ]


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_client_never_chooses_the_upstream(upstreams, stack, shape) -> None:
    pool = await upstreams(2)
    (outsider,) = await upstreams(1)
    server, envoy = await stack([u.address for u in pool], shape=shape)
    spoof = spoofing_headers(outsider.address, pool[1].address)
    for _ in range(4):
        status, _, text = await send(envoy.url, CHAT, headers=spoof)
        assert status == 200, text
        info = json.loads(text)
        assert (
            info["upstream"] in (pool[0].address, pool[1].address) and info["upstream"] == info["destination"]
        )
        # A bodyless request is decided too (on load), never on the client's headers.
        status, _, text = await send(envoy.url, path="/v1/models", headers=spoof, method="GET")
        assert status == 200 and json.loads(text)["upstream"] != outsider.address
    assert outsider.requests == []
    for seen in (r for u in pool for r in u.requests):
        # The gateway-only headers and the untrusted rewrite were removed before the request went upstream.
        for name in ("x-gateway-destination-endpoint-subset", "x-gateway-destination-endpoint-served",
                     "x-llm-d-model-name-rewrite"):  # fmt: skip
            assert name not in {k.lower() for k in seen["headers"]}, (name, seen["headers"])
        if seen["path"] != "/v1/models":
            assert json.loads(seen["body"])["model"] == "m"
    assert all(e.inflight_requests == 0 for e in server.pool)


async def test_the_picker_alone_overrides_a_spoofed_destination_without_the_gateways_strip(upstreams) -> None:
    """Defence in depth: with the strip filter taken out of the Envoy config, the picker's overwrite of the
    destination header is still what routes (also with the client sending it twice)."""
    pool = await upstreams(1)
    (outsider,) = await upstreams(1)
    server = Server(
        load_config(None, {"server": {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "admin_port": 0,
                                      "tls": {"enabled": False}}, "pool": {"endpoints": [pool[0].address]}})
    )  # fmt: skip
    ports = await server.start()
    options = EnvoyOptions(shape="gateway", epp_port=ports.extproc, pool=[pool[0].address])
    options.listen_port, options.admin_port = free_port(), free_port()
    config = render(options)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "strip-destination"]
    envoy = Envoy(options, config=config)
    await envoy.start()
    try:
        spoof = spoofing_headers(outsider.address, outsider.address)
        for _ in range(3):
            status, _, text = await send(envoy.url, CHAT, headers=spoof)
            assert status == 200 and json.loads(text)["upstream"] == pool[0].address, text
        assert outsider.requests == []
    finally:
        await envoy.stop()
        await server.stop()


@pytest.mark.parametrize("trusted", [False, True])
async def test_the_model_rewrite_header_counts_only_where_trusted(upstreams, stack, trusted) -> None:
    (up,) = await upstreams(1)
    security = {"trusted_control_headers": ["objective", "model_rewrite"] if trusted else []}
    _, envoy = await stack([up.address], security=security)
    status, _, text = await send(envoy.url, CHAT, headers={"x-llm-d-model-name-rewrite": "adapter-7"})
    assert status == 200, text
    seen = up.requests[0]
    assert json.loads(seen["body"])["model"] == ("adapter-7" if trusted else "m")
    assert ("x-llm-d-model-name-rewrite" in {k.lower() for k in seen["headers"]}) is trusted


@pytest.mark.parametrize("shape", ["gateway", "buffered", "ai-gateway"])
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
)
async def test_an_empty_post_to_an_inference_path_is_the_pickers_400(upstreams, stack, shape, path) -> None:
    (up,) = await upstreams(1)
    _, envoy = await stack([up.address], shape=shape)
    for body in (b"", None):  # content-length: 0, and no body at all
        status, response_headers, text = await send(envoy.url, body, path=path)
        assert status == 400, (body, text)
        error = json.loads(text)["error"]
        assert error["code"] == "bad_request" and "body is empty" in error["message"]
        assert response_headers["x-epp-reject-reason"] == "bad_request"
    # A chunked body with no data: Envoy hands the picker the headers, then an empty end of body.
    reader, writer = await raw_request(envoy.url, f"POST {path} HTTP/1.1\r\nhost: x\r\n"
                                       "transfer-encoding: chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
    try:
        status, text = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    assert status == 400 and "body is empty" in json.loads(text)["error"]["message"]
    assert up.requests == []  # nothing reached the model server
    # Body-less requests elsewhere are still routed on load alone.
    status, _, text = await send(envoy.url, path="/v1/models", method="GET")
    assert status == 200 and json.loads(text)["upstream"] == up.address
    status, _, _ = await send(envoy.url, b"", path="/v1/load_lora_adapter")
    assert status == 200


async def test_extproc_is_tls_by_default_and_refuses_plaintext(upstreams) -> None:
    (up,) = await upstreams(1)
    ports_only = {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "admin_port": 0}
    config = load_config(None, {"server": ports_only, "pool": {"endpoints": [up.address]}})
    assert config.server.tls.enabled
    server = Server(config)
    ports = await server.start()
    try:
        for tls in (False, True):
            envoy = Envoy(EnvoyOptions(shape="gateway", epp_port=ports.extproc, epp_tls=tls))
            await envoy.start()
            try:
                status, _, _ = await send(envoy.url, CHAT)
            finally:
                await envoy.stop()
            assert (status == 200) is tls, (tls, status)
        assert len(up.requests) == 1  # the plaintext attempt never reached the model server
    finally:
        await server.stop()


async def raw_request(url: str, data: str | bytes) -> Any:
    """Send raw bytes on a new connection to Envoy's listener: (reader, writer)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data.encode() if isinstance(data, str) else data)
    await writer.drain()
    return reader, writer


async def drip(
    url: str, path: str = "/v1/chat/completions", declared: int = 1000, sent: bytes = b'{"mo'
) -> Any:
    """A client that declares a body, sends a few bytes of it, then nothing: (reader, writer)."""
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += f"content-length: {declared}\r\n\r\n"
    return await raw_request(url, head.encode() + sent)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return status, (await reader.readexactly(length)).decode()


@pytest.mark.parametrize("shape", ["gateway", "buffered"])
async def test_a_slow_drip_body_gets_408_and_frees_its_stream(upstreams, stack, shape) -> None:
    (up,) = await upstreams(1)
    server, envoy = await stack([up.address], shape=shape, limits={"body_timeout_s": 0.5})
    reader, writer = await drip(envoy.url)
    try:
        status, body = await asyncio.wait_for(read_response(reader), 30)
    finally:
        writer.close()
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    await until(lambda: server.servicer.active_streams == 0, "the stream closed")
    assert server.servicer.budget.used == 0 and up.requests == []


async def test_streams_over_the_limit_get_503_and_room_comes_back(upstreams, stack) -> None:
    (up,) = await upstreams(1)
    server, envoy = await stack([up.address], limits={"max_streams": 1})
    reader, writer = await drip(envoy.url)  # holds the one stream open, mid-body
    await until(lambda: server.servicer.active_streams == 1, "the first stream open in the picker")
    status, headers, text = await send(envoy.url, CHAT)
    assert status == 503 and json.loads(text)["error"]["code"] == "too_many_streams"
    assert headers["x-epp-reject-reason"] == "too_many_streams"
    writer.close()  # the client goes away: Envoy resets its stream, the picker frees the slot
    await until(lambda: server.servicer.active_streams == 0, "the held stream closed")
    status, _, _ = await send(envoy.url, CHAT)
    assert status == 200
    del reader


async def test_bodies_being_collected_share_the_buffer_limit(upstreams, stack) -> None:
    (up,) = await upstreams(1)
    server, envoy = await stack([up.address], limits={"max_body_bytes": 4096, "max_buffered_bytes": 4096})
    reader, writer = await drip(envoy.url, declared=4000, sent=b'{"model": "m", "prompt": "' + b"x" * 3000)
    await until(lambda: server.servicer.budget.used >= 3000, "the first body buffered in the picker")
    status, _, text = await send(envoy.url, {"model": "m", "prompt": "y" * 2000}, path="/v1/completions")
    assert status == 503 and json.loads(text)["error"]["code"] == "buffers_full"
    writer.close()
    await until(lambda: server.servicer.budget.used == 0, "the first body released")
    status, _, _ = await send(envoy.url, {"model": "m", "prompt": "y" * 2000}, path="/v1/completions")
    assert status == 200
    del reader
