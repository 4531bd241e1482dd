"""How far the picker follows responses, through real Envoy, for every way of keeping response chunks away
from it: each setup must deliver every streamed response intact and in order (also several at once, sent
back to back by the upstream), release the picker's in-flight counts, and cost the picker the number of
gRPC messages it is meant to.

    gateway            request FULL_DUPLEX_STREAMED, response STREAMED: the picker stops after chunk one
    ai-gateway         FULL_DUPLEX_STREAMED both ways (Envoy AI Gateway's default): every chunk echoed
    buffered           request BUFFERED, response STREAMED: stops after chunk one
    buffered-override  BUFFERED both ways + allow_mode_override: the picker asks for STREAMED, then stops
    response-none      response body NONE, trailers SEND: headers only, the end still signalled
    follow-full        as gateway, with response.follow: full: every chunk acknowledged to the end
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.envoy

EVENTS = 200
STREAMS = 6
SETUPS: dict[str, dict[str, Any]] = {
    "gateway": {"shape": "gateway"},
    "ai-gateway": {"shape": "ai-gateway"},
    "buffered": {"shape": "buffered"},
    "buffered-override": {
        "shape": "buffered",
        "envoy": {
            "processing_mode": {"response_body_mode": "BUFFERED"},
            "extproc": {"allow_mode_override": True},
        },
    },
    "response-none": {"shape": "gateway", "envoy": {"processing_mode": {"response_body_mode": "NONE"}}},
    "follow-full": {"shape": "gateway", "response": {"follow": "full"}},
}
# What the picker is meant to do per streamed request: stop after the first chunk, or not.
STOPS_EARLY = {"gateway", "buffered", "buffered-override"}
ECHOES_EVERYTHING = {"ai-gateway", "follow-full"}


async def stream_once(
    session: aiohttp.ClientSession, url: str, i: int, first: asyncio.Event | None = None
) -> list[int]:
    """One streamed chat completion; sets `first` once its first event arrived."""
    body = {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}], "stream": True}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        head = await response.content.readuntil(b"\n\n")
        if first is not None:
            first.set()
        text = (head + await response.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: "))["index"] for e in events[:-1]]


@pytest.mark.parametrize("setup", list(SETUPS))
async def test_streamed_responses_arrive_intact_and_the_picker_pays_what_it_should(
    upstreams, stack, setup: str
) -> None:
    options = dict(SETUPS[setup])
    ups = await upstreams(2, sse_events=EVENTS, hold_after_first=True)
    server, envoy = await stack([u.address for u in ups], **options)
    servicer = server.servicer
    async with aiohttp.ClientSession() as session:
        firsts = [asyncio.Event() for _ in range(STREAMS)]
        streams = [
            asyncio.ensure_future(stream_once(session, envoy.url, i, firsts[i])) for i in range(STREAMS)
        ]
        async with asyncio.timeout(30):  # hang guard only
            # Every client has its first event; where the picker stops early, it has stopped: only then do
            # the upstreams send the rest, so it cannot ride along with the first chunk.
            await asyncio.gather(*(f.wait() for f in firsts))
            while setup in STOPS_EARLY and servicer.stopped_early < STREAMS:
                await asyncio.sleep(0.001)
        for u in ups:
            u.release.set()
        results = await asyncio.gather(*streams)
        async with session.post(envoy.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "not streamed"}]}) as response:  # fmt: skip
            assert response.status == 200 and json.loads(await response.text())["upstream"]
    assert all(indexes == list(range(EVENTS)) for indexes in results)

    async with asyncio.timeout(30):  # hang guard: Envoy ends the remaining streams as responses complete
        while servicer.active_streams or any(e.inflight_requests for e in server.pool):
            await asyncio.sleep(0.001)
    requests = STREAMS + 1
    assert servicer.streams == requests
    per_request = servicer.messages / requests
    if setup in STOPS_EARLY:
        assert servicer.stopped_early == STREAMS  # the JSON response came whole: nothing to stop early
        assert per_request <= 6  # request headers, body (trailers), response headers, first chunk
    elif setup in ECHOES_EVERYTHING:
        assert servicer.stopped_early == 0
        assert per_request > 6  # every chunk Envoy handed over (bursts arrive coalesced)
    else:  # response-none: headers only, the end of the stream still reaches the picker
        assert servicer.stopped_early == 0 and per_request <= 6


async def test_sampled_requests_are_followed_to_the_end(upstreams, stack) -> None:
    ups = await upstreams(1, sse_events=EVENTS, hold_after_first=True)
    server, envoy = await stack([ups[0].address], response={"full_sample_every": 2})
    async with aiohttp.ClientSession() as session:
        for i in range(4):  # decisions 1..4: every 2nd is followed to its end
            ups[0].release.clear()
            first = asyncio.Event()
            task = asyncio.ensure_future(stream_once(session, envoy.url, i, first))
            async with asyncio.timeout(30):  # hang guard only
                await first.wait()
                stops = i % 2 == 0
                while stops and server.servicer.stopped_early < i // 2 + 1:
                    await asyncio.sleep(0.001)
            ups[0].release.set()
            assert await task == list(range(EVENTS))
    async with asyncio.timeout(30):  # hang guard
        while server.servicer.active_streams:
            await asyncio.sleep(0.001)
    assert server.servicer.stopped_early == 2  # the other two were followed to their end
