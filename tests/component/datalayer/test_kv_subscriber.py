"""The KV-event subscriber over real ZMQ sockets on 127.0.0.1: the recorded vLLM stream, losses, replay."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from support.kvevents import RecordingSink

from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.kvevents.events import SEQ
from epp.datalayer.kvevents.subscriber import END_OF_REPLAY, KVEventSubscriber

FIXTURES = Path(__file__).parents[2] / "fixtures" / "realengine"
HANG_GUARD_S = 20.0


def recorded_frames() -> list[list[bytes]]:
    out = []
    for line in (FIXTURES / "kv_events_raw.jsonl").read_text().splitlines():
        item = json.loads(line)
        if "frames" in item:
            out.append([base64.b64decode(f) for f in item["frames"]])
    return out


async def until(condition, what: str) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


@pytest.fixture
async def publisher():
    context = zmq.asyncio.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    yield pub, context
    pub.close(linger=0)
    context.destroy(linger=0)


async def joined(pub, sink: RecordingSink, probe: list[bytes]) -> None:
    """Publish `probe` (a seq-0 message) until the subscriber hears one (ZMQ's slow-joiner window)."""

    async def heard() -> None:
        while not sink.calls:
            await pub.send_multipart(probe)
            await asyncio.sleep(0.02)

    async with asyncio.timeout(HANG_GUARD_S):
        await heard()


async def test_recorded_stream_arrives_in_order_and_a_gap_is_reported(publisher) -> None:
    pub, _ = publisher
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    frames = recorded_frames()
    sink = RecordingSink()
    sub = KVEventSubscriber(EndpointPool([Endpoint("127.0.0.1:1")]), sink, lambda e: endpoint)
    sub.start()
    try:
        await joined(pub, sink, frames[0])
        sink.calls.clear()
        for message in frames[1:8] + frames[9:]:  # seq 8 is lost
            await pub.send_multipart(message)
        await until(lambda: ("apply", 15) in sink.calls, "the last message arrives")
        assert sink.calls == [
            *(("apply", s) for s in range(1, 8)),
            ("desynced", "sequence gap"),
            *(("apply", s) for s in range(9, 16)),
        ]
        assert sub.stats["127.0.0.1:1"].gaps == 1
    finally:
        await sub.aclose()


async def test_replay_completes_the_view_on_connect_and_repairs_a_gap(publisher) -> None:
    pub, context = publisher
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    replay_endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    frames = recorded_frames()
    kept: dict[int, list[bytes]] = {}  # what the publisher has sent, by seq: its replay buffer

    async def send(message: list[bytes], live: bool = True) -> None:
        kept[SEQ.unpack(message[1])[0]] = message
        if live:
            await pub.send_multipart(message)

    async def serve_replay() -> (
        None
    ):  # vLLM's protocol: [id, b"", start] -> [id, b"", topic, seq, payload]...
        while True:
            identity, _, start = await router.recv_multipart()
            for seq in sorted(kept):
                if seq >= SEQ.unpack(start)[0]:
                    await router.send_multipart([identity, b"", *kept[seq]])
            await router.send_multipart([identity, b"", b"", SEQ.pack(END_OF_REPLAY), b""])

    server = asyncio.create_task(serve_replay())
    sink = RecordingSink()
    sub = KVEventSubscriber(
        EndpointPool([Endpoint("127.0.0.1:1")]), sink, lambda e: endpoint, replay_of=lambda e: replay_endpoint
    )
    await send(frames[0], live=False)  # published before the subscriber came: only the replay has it
    sub.start()
    try:
        # On connect, the replay from 0 makes the view complete without any live message.
        await until(lambda: ("apply", 0) in sink.calls, "the replay on connect")
        assert sink.calls == [("restarted", None), ("apply", 0)]
        sink.calls.clear()
        stats = sub.stats["127.0.0.1:1"]

        async def subscribed() -> None:  # ZMQ's slow joiner: probe (undecodable) until the live stream flows
            while not stats.decode_errors:
                await pub.send_multipart([b"probe", b"x"])
                await asyncio.sleep(0.02)

        async with asyncio.timeout(HANG_GUARD_S):
            await subscribed()
        for message in frames[1:3]:
            await send(message)
        for message in frames[3:6]:
            await send(message, live=False)  # lost on the live stream
        for message in frames[6:8]:
            await send(message)
        await until(lambda: ("apply", 7) in sink.calls, "the last message arrives")
        assert sink.calls == [("apply", s) for s in range(1, 8)]  # 3-5 replayed when 6 showed the gap
        assert stats.gaps == 0 and stats.repaired == 2
    finally:
        server.cancel()
        await sub.aclose()
        router.close(linger=0)


async def test_a_dropped_connection_makes_the_view_incomplete() -> None:
    """The engine restarts on the same port: its numbers (here 5, after 0-4 were lost to the slow joiner)
    could pass for a continuation of the old stream; the dropped connection says they are not."""
    context = zmq.asyncio.Context()
    first = context.socket(zmq.PUB)
    first.setsockopt(zmq.LINGER, 0)
    first.bind("tcp://127.0.0.1:*")
    endpoint = first.getsockopt(zmq.LAST_ENDPOINT).decode()
    frames = recorded_frames()
    sink = RecordingSink()
    sub = KVEventSubscriber(EndpointPool([Endpoint("127.0.0.1:1")]), sink, lambda e: endpoint)
    sub.start()
    try:
        await joined(first, sink, frames[0])
        for message in frames[1:4]:
            await first.send_multipart(message)
        await until(lambda: ("apply", 3) in sink.calls, "the first publisher's messages arrive")
        first.close(linger=0)  # the engine goes away...
        await until(lambda: ("desynced", "publisher disconnected") in sink.calls, "the drop is noticed")
        second = context.socket(zmq.PUB)  # ...and a new one binds the same port
        second.setsockopt(zmq.LINGER, 0)
        second.bind(endpoint)
        mark = len(sink.calls)

        async def heard() -> None:
            while len(sink.calls) == mark:
                await second.send_multipart(frames[5])
                await asyncio.sleep(0.02)

        async with asyncio.timeout(HANG_GUARD_S):
            await heard()
        assert sink.calls[mark] == ("desynced", "joined after the publisher's start")
        assert sub.stats["127.0.0.1:1"].disconnects == 1
        second.close(linger=0)
    finally:
        await sub.aclose()
        context.destroy(linger=0)
