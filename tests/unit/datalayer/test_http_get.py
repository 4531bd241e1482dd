"""The scrape client's connection protocol without sockets or the wall clock: responses fed byte by byte
into `_Connection` (split at every position), malformed heads and bodies failing on the bytes alone, and the
lazy deadline timer on a manual clock (each request gets exactly its own deadline). Real sockets:
tests/component/datalayer/test_http_get.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from epp.datalayer.scrape.http_get import BodyTooLarge, ProtocolError, ServerDisconnected, _Connection

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
BODY = b"".join(b'vllm:metric_%d{model_name="m"} %d.0\n' % (i, i) for i in range(40))


class ManualClock:
    """What `_Connection` needs of its loop: futures from the running loop; time and timers by hand."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.now = 0.0
        self.timers: list[Timer] = []

    def create_future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self.timers.append(timer)
        return timer

    async def advance_to(self, when: float) -> None:
        """Move the clock to `when`, firing due timers in order (and letting their effects run)."""
        while True:
            due = sorted((t for t in self.timers if not t.cancelled and t.when <= when), key=lambda t: t.when)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
            await asyncio.sleep(0)
        self.now = when
        await asyncio.sleep(0)


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True


def connect(clock: ManualClock, max_body: int = 1 << 20) -> tuple[_Connection, FakeTransport]:
    conn = _Connection(clock, max_body)  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def feed(conn: _Connection, data: bytes) -> None:
    """Deliver `data` as the event loop does: into the buffer the protocol hands out, piece by piece."""
    while data:
        buffer = conn.get_buffer(-1)
        n = min(len(buffer), len(data))
        buffer[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


async def start(conn: _Connection, deadline: float = 100.0) -> asyncio.Task[tuple[int, bytes]]:
    task = asyncio.ensure_future(conn.request(REQUEST, deadline))
    await asyncio.sleep(0)  # the request is written and waits for its response
    return task


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


RESPONSES = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 97),
    "interim-100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
    % (len(BODY), BODY),
}


@pytest.mark.parametrize("kind", list(RESPONSES))
async def test_a_response_split_at_every_position_parses_the_same(kind: str) -> None:
    wire = RESPONSES[kind]
    clock = ManualClock()
    conn, transport = connect(clock)
    for split in range(1, len(wire)):
        task = await start(conn)
        feed(conn, wire[:split])
        await asyncio.sleep(0)
        assert not task.done(), split
        feed(conn, wire[split:])
        assert await task == (200, BODY), split
    assert not conn.closed and not transport.aborted  # one keep-alive connection throughout
    assert transport.written == [REQUEST] * (len(wire) - 1)


async def test_eof_delimited_body_completes_at_the_close() -> None:
    conn, _ = connect(ManualClock())
    task = await start(conn)
    feed(conn, b"HTTP/1.0 200 OK\r\n\r\n" + BODY[:100])
    feed(conn, BODY[100:])
    await asyncio.sleep(0)
    assert not task.done()
    conn.eof_received()
    assert await task == (200, BODY)
    assert conn.closed  # never reused


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"HTP/1.1 200 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "bad status line"),
        (b"hello world\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n", "not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "chunk size line too long"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Junk: y\r\n" * 7000, "head longer"),
    ],
)
async def test_malformed_responses_fail_on_the_bytes_alone(wire: bytes, message: str) -> None:
    # Decided by the parser as the bytes arrive: no timer fires, no further byte is awaited.
    clock = ManualClock()
    conn, transport = connect(clock)
    task = await start(conn)
    feed(conn, wire)
    with pytest.raises(ProtocolError, match=message):
        await task
    assert clock.now == 0.0 and transport.aborted and conn.closed


async def test_a_response_cut_short_by_the_server_is_a_protocol_error() -> None:
    conn, _ = connect(ManualClock())
    task = await start(conn)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    conn.connection_lost(None)
    with pytest.raises(ProtocolError, match="closed in the middle"):
        await task


async def test_a_close_before_any_byte_is_server_disconnected() -> None:
    conn, _ = connect(ManualClock())
    task = await start(conn)
    conn.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(ServerDisconnected):
        await task


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 2000, 300),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 2000,
    ],
    ids=["content-length", "chunked", "eof"],
)
async def test_oversized_bodies_are_refused_without_reading_them(wire: bytes) -> None:
    conn, transport = connect(ManualClock(), max_body=1024)
    task = await start(conn)
    feed(conn, wire)
    with pytest.raises(BodyTooLarge, match="1024"):
        await task
    assert transport.aborted


async def test_bytes_nobody_asked_for_drop_the_connection() -> None:
    conn, transport = connect(ManualClock())
    task = await start(conn)
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
    assert await task == (200, b"ok")
    assert conn.closed and transport.aborted


# -- the deadline timer -------------------------------------------------------------------------------------


async def test_each_request_gets_exactly_its_own_deadline() -> None:
    # One lazy timer serves a connection's requests: it must neither fire at an earlier request's deadline
    # nor miss a shorter one.
    clock = ManualClock()
    conn, _ = connect(clock)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for _ in range(4):  # the timer is armed for the first request's deadline, 0.3 s after it started
        task = await start(conn, clock.now + 0.3)
        feed(conn, ok)
        assert await task == (200, b"ok")
        await clock.advance_to(clock.now + 0.04)
    started = clock.now  # 0.16: the first request's timer (0.3) is still armed
    task = await start(conn, started + 0.3)
    await clock.advance_to(started + 0.3 - 1e-9)
    assert not task.done()  # not timed out by the first request's timer at 0.3
    await clock.advance_to(started + 0.3)
    with pytest.raises(TimeoutError):
        await task


async def test_a_shorter_deadline_rearms_the_timer_earlier() -> None:
    clock = ManualClock()
    conn, _ = connect(clock)
    task = await start(conn, 5.0)  # arms the timer 5 s ahead
    feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await task
    task = await start(conn, clock.now + 0.05)
    await clock.advance_to(0.05)
    with pytest.raises(TimeoutError):
        await task  # at its own 0.05 s, not after 5 s


async def test_cancelling_a_request_drops_its_connection() -> None:
    conn, transport = connect(ManualClock())
    task = await start(conn)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.closed and transport.aborted
