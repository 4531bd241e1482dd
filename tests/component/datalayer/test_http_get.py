"""KeepAliveGet against real local servers on 127.0.0.1: aiohttp, and raw asyncio servers that script the
bytes of each response (chunk boundaries, closes, stalls, malformed heads). Waits are for events (a request
arrived, a connection closed), never for time; parsing and the deadline timer are tested byte by byte on a
manual clock in tests/unit/datalayer/test_http_get.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from epp.datalayer.scrape.http_get import BodyTooLarge, KeepAliveGet, ProtocolError, ServerDisconnected

PAGE = "".join(f'vllm:metric_{i}{{model_name="m",le="{i}"}} {i}.0 — ü\n' for i in range(800)).encode()
assert len(PAGE) > 32_000

Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class RawServer:
    """Per connection: read a request head, call `respond(reader, writer, n)` (n = request number on this
    connection, from 0); it returns False to close the connection. Counts connections opened and open."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.opened = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait for a connection or request event after which `condition` holds."""
        async with asyncio.timeout(30):  # a hang guard, not a timing assertion
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open += 1
        self._changed.set()
        try:
            n = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(head)
                self._changed.set()
                if not await self.respond(reader, writer, n):
                    return
                n += 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.transport.abort()
            self._changed.set()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def until_closed(self) -> None:
        """Wait until the server has seen every connection close."""
        await self.until(lambda: self.open == 0)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Respond], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(respond: Respond) -> RawServer:
        server = await RawServer(respond).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@contextlib.asynccontextmanager
async def client(port: int, **kwargs: int) -> AsyncIterator[KeepAliveGet]:
    get = KeepAliveGet("127.0.0.1", port, "/metrics", **kwargs)
    try:
        yield get
    finally:
        get.close()


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """`body` as chunks of the given sizes (cycled), with an extension on one and a trailer at the end."""
    out, i, k = bytearray(), 0, 0
    while i < len(body):
        size = min(sizes[k % len(sizes)], len(body) - i)
        ext = b";name=value" if k == 1 else b""
        out += b"%x%s\r\n%s\r\n" % (size, ext, body[i : i + size])
        i, k = i + size, k + 1
    return bytes(out) + b"0\r\nX-Trailer: yes\r\n\r\n"


async def stall(reader: asyncio.StreamReader) -> None:
    """Send nothing more, until the client closes the connection (or 30 s)."""
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 30)


async def write_in_pieces(writer: asyncio.StreamWriter, data: bytes, piece: int) -> None:
    """Write `data` in `piece`-byte writes, yielding to the loop between them so reads see the splits."""
    for i in range(0, len(data), piece):
        writer.write(data[i : i + piece])
        await writer.drain()
        await asyncio.sleep(0)


# -- bodies ------------------------------------------------------------------------------------------------


async def test_content_length_over_one_keep_alive_connection() -> None:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept", ""))
        return web.Response(body=PAGE, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with client(runner.addresses[0][1]) as get:
            for _ in range(20):
                assert await get.get(1.0) == (200, PAGE)
            assert get.connects == 1
            assert seen == ["text/plain"] * 20
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("sizes", "piece"), [([4096], 1000), ([1, 7, 300, 4095, 2], 13), ([65536], 1)])
async def test_chunked_split_across_many_writes(
    raw: Callable[[Respond], Awaitable[RawServer]], sizes: list[int], piece: int
) -> None:
    body = PAGE if piece > 1 else PAGE[:3000]  # byte-by-byte: a shorter page keeps the test fast
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
        body, sizes
    )

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await write_in_pieces(writer, wire, piece)
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        for _ in range(3):
            assert await get.get(5.0) == (200, body)
        assert get.connects == 1


@pytest.mark.parametrize(("size", "piece"), [(len(PAGE), 1000), (600_000, 200_000)])
async def test_content_length_split_across_reads(
    raw: Callable[[Respond], Awaitable[RawServer]], size: int, piece: int
) -> None:
    # Bodies arriving over several reads (and larger than the 256 KiB read buffer) are read into place.
    body = (PAGE * (size // len(PAGE) + 1))[:size]
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await write_in_pieces(writer, wire, piece)
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        for _ in range(3):
            assert await get.get(5.0) == (200, body)
        assert get.connects == 1


async def test_interim_response_and_empty_bodies(raw: Callable[[Respond], Awaitable[RawServer]]) -> None:
    wires = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
    ]

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(wires[n])
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        assert await get.get(1.0) == (200, b"ok")
        assert await get.get(1.0) == (204, b"")
        assert await get.get(1.0) == (503, b"")
        assert get.connects == 1


# -- connection management ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(PAGE),  # close after it
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # body delimited by EOF
        b"HTTP/1.0 200 OK\r\n\r\n",  # HTTP/1.0: no keep-alive, EOF-delimited
    ],
)
async def test_server_closing_after_each_response(
    raw: Callable[[Respond], Awaitable[RawServer]], head: bytes
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await write_in_pieces(writer, head + PAGE, 8192)
        return False  # close

    server = await raw(respond)
    async with client(server.port) as get:
        for _ in range(3):
            assert await get.get(1.0) == (200, PAGE)
        assert get.connects == 3
    await server.until_closed()


async def test_reconnects_after_idle_keep_alive_close(raw: Callable[[Respond], Awaitable[RawServer]]) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # the server closes the connection once idle (as an idle timeout would)

    server = await raw(respond)
    async with client(server.port) as get:
        for _ in range(3):
            assert await get.get(1.0) == (200, b"ok")
            await server.until_closed()
            async with asyncio.timeout(30):  # hang guard: the client sees the close (an event)
                while get._conn is not None and not get._conn.closed:
                    await asyncio.sleep(0)
        # The close had arrived: each get reconnected without a failed attempt on the dead connection.
        assert get.connects == 3 and len(server.requests) == 3 and get.retries == 0


async def test_stale_connection_is_retried_once(raw: Callable[[Respond], Awaitable[RawServer]]) -> None:
    # The server closes the kept-alive connection upon the second request (as if its idle timer fired while
    # our request was on the wire): the client retries on a new connection and succeeds.
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        assert await get.get(1.0) == (200, b"ok")
        assert await get.get(1.0) == (200, b"ok")
        assert get.connects == 2 and server.opened == 2 and get.retries == 1


async def test_server_closing_without_answer_fails_after_one_retry(
    raw: Callable[[Respond], Awaitable[RawServer]],
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 0 and server.opened == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        return False  # from now on: close without answering

    server = await raw(respond)
    async with client(server.port) as get:
        assert await get.get(1.0) == (200, b"ok")
        with pytest.raises(ServerDisconnected):
            await get.get(1.0)
        assert server.opened == 2  # the reused connection, then exactly one retry
        with pytest.raises(ServerDisconnected):  # a fresh connection is not retried
            await get.get(1.0)
        assert server.opened == 3
    await server.until_closed()


async def test_refused_port_raises_oserror() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with client(port) as get:
        with pytest.raises(ConnectionRefusedError):
            await get.get(1.0)
        with pytest.raises(ConnectionRefusedError):
            await get.get(1.0)


async def test_slow_server_times_out_and_the_next_request_reconnects(
    raw: Callable[[Respond], Awaitable[RawServer]],
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if server.opened == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")  # then stalls
            await stall(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        with pytest.raises(TimeoutError):
            await get.get(0.05)
        await server.until_closed()  # the stalled connection was dropped, not kept
        assert await get.get(1.0) == (200, b"ok")
        assert get.connects == 2


async def test_cancelled_request_drops_its_connection(raw: Callable[[Respond], Awaitable[RawServer]]) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if server.opened == 1:
            await stall(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        task = asyncio.create_task(get.get(5.0))
        await server.until(lambda: bool(server.requests))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.until_closed()
        assert await get.get(1.0) == (200, b"ok")
    await server.until_closed()  # close() released the second connection too


async def test_close_during_a_request_fails_it_at_once(
    raw: Callable[[Respond], Awaitable[RawServer]],
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await stall(reader)
        return False

    server = await raw(respond)
    get = KeepAliveGet("127.0.0.1", server.port)
    task = asyncio.create_task(get.get(5.0))
    await server.until(lambda: bool(server.requests))
    get.close()
    with pytest.raises(ConnectionAbortedError):
        await task  # at once: close() fails the waiting request, its 5 s deadline is not awaited
    await server.until_closed()


# -- limits and malformed responses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 2000, [300]),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 2000,
    ],
    ids=["content-length", "chunked", "eof"],
)
async def test_oversized_body(raw: Callable[[Respond], Awaitable[RawServer]], wire: bytes) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await write_in_pieces(writer, wire, 500)
        await stall(reader)  # a well-behaved client does not wait for the rest
        return True

    server = await raw(respond)
    async with client(server.port, max_body=1024) as get:
        with pytest.raises(BodyTooLarge, match="1024"):
            await get.get(1.0)
        await server.until_closed()


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
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the middle"),  # then EOF
    ],
)
async def test_malformed_responses_raise(
    raw: Callable[[Respond], Awaitable[RawServer]], wire: bytes, message: str
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(wire)
        await writer.drain()
        if message == "closed in the middle":
            return False
        await stall(reader)  # no EOF to rescue a client that would wait for more
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        with pytest.raises(ProtocolError, match=message):
            await get.get(5.0)
        await server.until_closed()


async def test_bytes_after_a_complete_response_drop_the_connection(
    raw: Callable[[Respond], Awaitable[RawServer]],
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE")
        return True

    server = await raw(respond)
    async with client(server.port) as get:
        assert await get.get(1.0) == (200, b"ok")
        assert await get.get(1.0) == (200, b"ok")
        assert get.connects == 2


def test_for_address_parses_host_and_port() -> None:
    get = KeepAliveGet.for_address("10.0.0.1:8000", "/m")
    assert (get.host, get.port) == ("10.0.0.1", 8000)
    assert get._request == b"GET /m HTTP/1.1\r\nHost: 10.0.0.1:8000\r\nAccept: text/plain\r\n\r\n"
    v6 = KeepAliveGet.for_address("[::1]:9000")
    assert (v6.host, v6.port) == ("::1", 9000)
    assert b"Host: [::1]:9000\r\n" in v6._request
    for bad in ("nohost", "host:", ":80", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            KeepAliveGet.for_address(bad)
