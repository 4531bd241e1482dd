"""vLLM-style KV-cache events from a simulated replica: a ZMQ PUB socket on the replica's port + offset, and
vLLM's replay socket (ROUTER) on the next port.

Same wire format as vLLM (`epp.datalayer.kvevents.events`): one message per engine step that produced events,
frames `[topic, seq as 8-byte big-endian, msgpack [ts, [event maps], dp_rank 0]]`, seq from 0 at start. The
events (`Engine.kv_events`) carry the simulator's token ids (xxh32 of each 4-character piece of the prompt),
so the picker's precise scorer reproduces the blocks with `tokenizer: simulator`.

Replay, as vLLM's: the last `REPLAY_BUFFER` messages are kept; a DEALER sends `[b"", start seq]` and gets
`[b"", topic, seq, payload]` for each kept message with seq >= start, then `[b"", b"", 2**64-1, b""]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from typing import Any

TOPIC = b"kv-events"
REPLAY_BUFFER = 10_000  # messages kept for replay (vLLM's default buffer_steps)
_SEQ = struct.Struct(">Q")
_END = _SEQ.pack(2**64 - 1)


class KVEventPublisher:
    """One replica's publisher at `tcp://host:port` and replay socket at `port + 1` (raises `OSError` if a
    port is taken). `serve_replay()` answers replay requests until cancelled."""

    def __init__(self, host: str, port: int) -> None:
        import msgpack
        import zmq
        import zmq.asyncio

        self._pack = msgpack.Packer().pack
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._router: Any = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(f"tcp://{host}:{port}")
            self._router.bind(f"tcp://{host}:{port + 1}")
        except zmq.ZMQError as err:
            self.close()
            raise OSError(err.errno, f"cannot publish KV events on {host}:{port}-{port + 1}: {err}") from None
        self.address = f"tcp://{host}:{port}"
        self.seq = 0
        self._kept: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER)

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Send one step's events (never blocks: a PUB socket drops when a subscriber lags)."""
        import zmq

        payload = self._pack([time.time(), events, 0])
        seq = _SEQ.pack(self.seq)
        with contextlib.suppress(zmq.Again):  # PUB drops rather than raising; kept for safety
            self._socket.send_multipart([TOPIC, seq, payload], flags=zmq.NOBLOCK)
        self._kept.append((self.seq, payload))
        self.seq += 1

    async def serve_replay(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != _SEQ.size:
                continue
            identity, start = frames[0], _SEQ.unpack(frames[2])[0]
            for seq, payload in list(self._kept):
                if seq >= start:
                    await self._router.send_multipart([identity, b"", TOPIC, _SEQ.pack(seq), payload])
            await self._router.send_multipart([identity, b"", b"", _END, b""])

    def close(self) -> None:
        self._socket.close(linger=0)
        self._router.close(linger=0)


def start_replay(publisher: KVEventPublisher) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(publisher.serve_replay(), name="kv-events-replay")
