"""Subscribe to every endpoint's KV-event publisher (ZMQ PUB) and hand the decoded batches to a sink.

One asyncio task per endpoint of the pool (started and cancelled as the pool changes), each with a
non-blocking `zmq.asyncio` SUB socket connected to the address `address_of(endpoint)` returns (a
per-endpoint convention, e.g. the endpoint's host and a fixed port, or its port plus an offset). ZMQ
connects and reconnects in the background, so a publisher that is not up yet costs nothing; receiving
never blocks the event loop, and each message's work is bounded by one engine step's events.

Sequence numbers decide whether the sink's view of an endpoint is complete (`SequenceTracker`):

    first message seq 0, or seq back to 0     the publisher (re)started: its cache was empty, the view is
                                              exact from here (`sink.restarted`)
    seq = last + 1                            in order
    seq > last + 1, first message seq > 0,    messages were missed (dropped at the publisher's high-water
    or seq < last but not 0                   mark, subscriber joined late, restart not seen): if the
                                              endpoint has a replay socket, the missing range is asked for
                                              (vLLM's ROUTER: [b"", start seq] -> [b"", topic, seq,
                                              payload]... then an end marker with seq 2**64-1); if the
                                              replay covers it, nothing was lost; otherwise
                                              `sink.desynced(address, reason)` and the view is incomplete
                                              until the publisher restarts or clears its cache
    the connection dropped (ZMQ monitor)      what the publisher sent meanwhile is lost, and the one that
                                              answers next may be a restarted engine: `sink.desynced` at
                                              once, and the next message counts as a first one
    connected, with a replay socket           everything after the last message seen is replayed at once
                                              (from 0 on a first connection): complete without waiting for
                                              the next event, and nothing lost to ZMQ's slow-joiner window
                                              (live copies of replayed messages are skipped)

The sink is synchronous and runs on the event loop (the index lives there, as the scheduler does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.kvevents.events import SEQ, DecodeError, EventBatch, decode_frames, decode_payload

log = logging.getLogger(__name__)

END_OF_REPLAY = 2**64 - 1  # vLLM's replay end marker (-1 as a signed 64-bit int)


class EventSink(Protocol):
    def apply(self, address: str, batch: EventBatch) -> None:
        """One batch of `address`, in sequence order."""
        ...

    def restarted(self, address: str) -> None:
        """`address`'s publisher (re)started: its cache is empty and the next batches are complete."""
        ...

    def desynced(self, address: str, reason: str) -> None:
        """Batches of `address` were lost: what the sink knows about it is incomplete from now on."""
        ...


Verdict = Literal["start", "next", "duplicate", "gap", "joined", "restart-missed"]


class SequenceTracker:
    """Classifies each message of one publisher by its sequence number (see the module docstring).

    `replayed_from`: after a replay delivered messages `replayed_from .. last`, live copies of them (the
    subscription and the replay overlap) are duplicates, until a newer message arrives."""

    __slots__ = ("last", "replayed_from")

    def __init__(self) -> None:
        self.last: int | None = None
        self.replayed_from: int | None = None

    def check(self, seq: int) -> Verdict:
        last = self.last
        if last is None:
            return "start" if seq == 0 else "joined"
        if self.replayed_from is not None:
            if self.replayed_from <= seq <= last:
                return "duplicate"
            self.replayed_from = None
        if seq == last + 1:
            return "next"
        if seq > last + 1:
            return "gap"
        if seq == 0:
            return "start"
        return "restart-missed"

    def advance(self, seq: int) -> None:
        self.last = seq

    def reset(self) -> None:
        self.last = self.replayed_from = None


@dataclass(slots=True)
class StreamStats:
    """Counters of one endpoint's event stream (for `epp endpoints`)."""

    messages: int = 0
    gaps: int = 0  # losses the replay could not repair
    repaired: int = 0  # losses repaired by a replay
    restarts: int = 0
    disconnects: int = 0
    decode_errors: int = 0
    last_seq: int = -1


class KVEventSubscriber:
    """Follows `pool`: one SUB socket per endpoint whose `address_of(endpoint)` is not None.

    `replay_of(endpoint)`: the endpoint's replay ROUTER address, or None (gaps are then reported to the
    sink as they are). Call `start()` on the running event loop and `aclose()` to stop.
    """

    def __init__(
        self,
        pool: EndpointPool,
        sink: EventSink,
        address_of: Callable[[Endpoint], str | None],
        *,
        replay_of: Callable[[Endpoint], str | None] | None = None,
        topic: str = "",
        replay_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.sink = sink
        self.address_of = address_of
        self.replay_of = replay_of
        self.topic = topic
        self.replay_timeout_s = replay_timeout_s
        self.stats: dict[str, StreamStats] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._context: Any = None
        self._started = False
        pool.on_changed(self._sync)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        import zmq.asyncio  # the `precise` extra

        if self._started:
            return
        self._started = True
        self._context = zmq.asyncio.Context()
        self._sync()

    async def aclose(self) -> None:
        self._started = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def _sync(self) -> None:
        if not self._started:
            return
        current = {e.address: e for e in self.pool}
        for address in [a for a in self._tasks if a not in current]:
            self._tasks.pop(address).cancel()
            self.stats.pop(address, None)
        for address, endpoint in current.items():
            if address in self._tasks:
                continue
            source = self.address_of(endpoint)
            if source is None:
                continue
            replay = self.replay_of(endpoint) if self.replay_of is not None else None
            self.stats[address] = StreamStats()
            self._tasks[address] = asyncio.get_running_loop().create_task(
                self._follow(address, source, replay), name=f"kv-events {address}"
            )

    # -- one endpoint ----------------------------------------------------------------------------------

    async def _follow(self, address: str, source: str, replay: str | None) -> None:
        import zmq

        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2_000)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        stream = _Stream(address, replay)
        # The monitor before connecting, or the first handshake may pass unseen.
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        watcher = asyncio.get_running_loop().create_task(self._watch(stream, sock, monitor))
        sock.connect(source)
        stats = self.stats[address]
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    batch = decode_frames(frames)
                except DecodeError as err:
                    stats.decode_errors += 1
                    if stats.decode_errors == 1:
                        log.warning("kv events from %s (%s): undecodable message: %s", address, source, err)
                    continue
                async with stream.lock:
                    await self._deliver(address, batch, stream.tracker, stats, replay)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: log it, the endpoint's view is no longer followed
            log.exception("kv events from %s (%s): subscriber stopped", address, source)
            self.sink.desynced(address, "subscriber stopped")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            sock.close(linger=0)

    async def _watch(self, stream: _Stream, sock: Any, monitor: Any) -> None:
        """Connection events of one endpoint's socket (ZMQ monitor).

        Connected: with a replay socket, ask at once for everything after the last message seen (from 0
        on a first connection), so that the view is complete without waiting for the next event (an idle
        engine publishes nothing) and the messages published before the subscription took effect (ZMQ's
        "slow joiner") are not lost. An empty replay from 0 means the publisher has sent nothing since its
        start: its cache is empty. Disconnected: what the publisher sent meanwhile is lost, and the one
        that answers next may be a restarted engine whose numbers look like a continuation: the view is
        incomplete, and the next message counts as a first one."""
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        address, stats = stream.address, self.stats[stream.address]
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    async with stream.lock:
                        stats.disconnects += 1
                        stream.tracker.reset()
                        self.sink.desynced(address, "publisher disconnected")
                elif stream.replay is not None:
                    async with stream.lock:
                        try:
                            await self._catch_up(stream, stats)
                        except Exception:  # a bug: the live stream still decides
                            log.exception("kv events from %s: replay on connect failed", address)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)

    async def _catch_up(self, stream: _Stream, stats: StreamStats) -> None:
        """Replay everything after the last message seen (see `_watch`)."""
        assert stream.replay is not None
        tracker = stream.tracker
        start = 0 if tracker.last is None else tracker.last + 1
        got = await self._replay(stream.address, stream.replay, start, None)
        if got is None:
            return  # no answer: the live stream decides, as without a replay socket
        if got and got[0].seq != start:
            stats.gaps += 1
            self.sink.desynced(stream.address, "replay buffer does not reach back far enough")
        elif start == 0:
            self.sink.restarted(stream.address)  # complete from the publisher's start (maybe empty)
        if got:
            for batch in got:
                self.sink.apply(stream.address, batch)
            tracker.replayed_from = got[0].seq
            tracker.advance(got[-1].seq)
            stats.repaired += 1
            stats.last_seq = got[-1].seq
        elif start == 0:
            tracker.replayed_from = None  # nothing published yet: the next message is seq 0

    async def _deliver(
        self,
        address: str,
        batch: EventBatch,
        tracker: SequenceTracker,
        stats: StreamStats,
        replay: str | None,
    ) -> None:
        verdict = tracker.check(batch.seq)
        if verdict == "duplicate":
            return
        stats.messages += 1
        stats.last_seq = batch.seq
        if verdict == "start":
            if tracker.last is not None:
                stats.restarts += 1
            self.sink.restarted(address)
        elif verdict != "next":
            # Missed messages: from the last one seen (0 when joining or after an unseen restart).
            start = 0 if verdict != "gap" or tracker.last is None else tracker.last + 1
            missed = await self._replay(address, replay, start, batch.seq) if replay else None
            if missed is None:
                stats.gaps += 1
                reason = {"gap": "sequence gap", "joined": "joined after the publisher's start"}.get(
                    verdict, "publisher restarted unseen"
                )
                log.info("kv events from %s: %s (seq %s after %s)", address, reason, batch.seq, tracker.last)
                self.sink.desynced(address, reason)
            else:
                stats.repaired += 1
                if start == 0:
                    self.sink.restarted(address)
                for old in missed:
                    self.sink.apply(address, old)
        tracker.advance(batch.seq)
        self.sink.apply(address, batch)

    async def _replay(
        self, address: str, endpoint: str, start: int, until: int | None
    ) -> list[EventBatch] | None:
        """Messages `start .. until-1` from the publisher's replay socket, or None if it cannot give
        exactly those (buffer too short, no answer within `replay_timeout_s`). `until` None: every message
        from `start` on that the publisher holds, in order, as they are (the caller checks the start)."""
        import zmq

        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[EventBatch] = []
        try:
            sock.connect(endpoint)
            await sock.send_multipart([b"", SEQ.pack(start)])
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) != 4:
                        return None
                    _, topic, seq_frame, payload = frames
                    seq = SEQ.unpack(seq_frame)[0] if len(seq_frame) == SEQ.size else END_OF_REPLAY
                    if seq == END_OF_REPLAY:
                        break
                    if until is None or seq < until:
                        out.append(decode_payload(seq, payload, topic.decode("utf-8", "replace")))
        except (TimeoutError, DecodeError, zmq.ZMQError) as err:
            log.info("kv events from %s: replay from %d failed: %s", address, start, err)
            return None
        finally:
            sock.close(linger=0)
        if until is None:
            seqs = [b.seq for b in out]
            return out if not seqs or seqs == list(range(seqs[0], seqs[0] + len(seqs))) else None
        return out if [b.seq for b in out] == list(range(start, until)) else None


class _Stream:
    """One endpoint's subscription state, shared by its receive loop and its connection watcher (the lock
    keeps a replay and live delivery from interleaving)."""

    __slots__ = ("address", "lock", "replay", "tracker")

    def __init__(self, address: str, replay: str | None) -> None:
        self.address = address
        self.replay = replay
        self.tracker = SequenceTracker()
        self.lock = asyncio.Lock()
