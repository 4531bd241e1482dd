"""A minimal HTTP/1.1 keep-alive GET client for scraping one URL of one server, again and again.

Why not aiohttp: through aiohttp's `ClientSession` the HTTP part of a scrape costs ~0.25 ms of CPU
(request/response objects, header multidicts, stream readers, timers, tracing hooks), while the work itself
is one write of a pre-built request and one or two reads of the response. Here it is one write, usually one
`recv_into` into a reused buffer (`asyncio.BufferedProtocol`), a parse of the head, one copy of the body and
one future; the whole scrape including parsing costs about half of what it did (`benchmarks/bench_scrape.py`,
numbers in `epp.datalayer.scrape.scraper`).

Scope, deliberately narrow: one `KeepAliveGet` per (host, port, path), at most one request in flight, one
persistent connection, plain HTTP. The response body may be delimited by `Content-Length`,
`Transfer-Encoding: chunked` or the end of the connection (`Connection: close`, HTTP/1.0). A connection the
server closed while idle is replaced before the next request; if a reused connection dies before any byte of
the response arrived (the server closed it while our request was on its way), the request is retried once
on a new connection, which is safe for a GET. Every failure leaves no connection behind: the next request
connects afresh. Errors are `TimeoutError`, `OSError` (refused, reset, closed: `ServerDisconnected`) or
`HttpGetError` (`ProtocolError` for a malformed response, `BodyTooLarge` beyond `max_body`).
"""

from __future__ import annotations

import asyncio
import threading

MAX_BODY = 8 * 1024 * 1024  # a /metrics page is 10-100 KB; far more means something is wrong
MAX_HEAD = 64 * 1024  # status line + headers
_MAX_CHUNK_LINE = 4096  # chunk size + extensions, or one trailer line

# Parser states of a connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _TO_EOF = range(8)


class HttpGetError(Exception):
    """The server answered, but not with a response this client accepts."""


class ProtocolError(HttpGetError):
    """Malformed HTTP: bad status line, header, chunk size, or a response cut short."""


class BodyTooLarge(HttpGetError):
    """The body exceeds `max_body` (the connection is dropped rather than read to the end)."""


class ServerDisconnected(ConnectionError):
    """The connection closed (or was reset) before any byte of the response arrived."""


_local = threading.local()


def _read_buffer() -> tuple[bytearray, memoryview]:
    """This thread's receive buffer, shared by its connections: each read is parsed (and whatever must be
    kept is copied out) before the loop reads again, so one buffer serves them all. As large as asyncio's own
    read size, so a whole page usually arrives in one `recv_into`."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        raw = bytearray(256 * 1024)
        buffer = _local.buffer = (raw, memoryview(raw))
    return buffer


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection and the incremental parser of the response to its current request.

    A `BufferedProtocol`: the loop reads into our buffer (`recv_into`) instead of allocating a 256 KiB
    `bytes` per read as `Protocol.data_received` does on the default loop (measured: ~80 µs of system time
    per 32 KB response, more than all the rest of the client). A Content-Length body split over several
    reads is received directly into its preallocated bytearray."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self.loop = loop
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False  # EOF, reset or closed by us: never reuse
        self.responses = 0  # complete responses read on this connection
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._deadline = 0.0  # loop time by which the current response must be complete
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._state = _IDLE
        self._rbuf, self._rview = _read_buffer()
        self._pending = bytearray()  # unparsed bytes carried over to the next read
        self._scanned = 0  # bytes of `_pending` already searched for the end of the head
        self._received = False  # any byte of the current response seen
        self._status = 0
        self._keep_alive = True
        self._remaining = 0  # of the Content-Length body or of the current chunk
        self._body = bytearray()  # chunked or EOF-delimited body so far; Content-Length body (preallocated)
        self._filled = -1  # bytes of a preallocated Content-Length body received; -1: not preallocated

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled >= 0 and self._state == _LENGTH:  # straight into the body, no further
            return memoryview(self._body)[self._filled :]
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        state = self._state
        if state == _IDLE:  # bytes nobody asked for: the stream can no longer be trusted
            self._drop()
            return
        self._received = True
        if self._filled >= 0 and state == _LENGTH:
            self._filled += nbytes
            if self._filled == len(self._body):
                self._complete(bytes(self._body))
            return
        pending = self._pending
        if pending:
            pending += self._rview[:nbytes]
            buf, end = pending, len(pending)
        else:
            buf, end = self._rbuf, nbytes
        try:
            pos = self._parse(buf, end)
        except HttpGetError as exc:
            self._fail(exc)
            return
        if buf is pending:
            del pending[:pos]
        elif pos < end:
            pending += self._rview[pos:end]

    def eof_received(self) -> bool:
        self._closed_by_peer(None)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer(exc)
        self.transport = None

    # -- request ---------------------------------------------------------------------------------------

    async def request(self, payload: bytes, deadline: float) -> tuple[int, bytes]:
        """Send `payload` and wait for the response until `deadline` (loop time)."""
        assert self.transport is not None and self._state == _IDLE
        waiter = self._waiter = self.loop.create_future()
        self._state = _HEAD
        self._received = False
        self.transport.write(payload)
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)
        try:
            return await waiter
        except BaseException:  # incl. the caller's cancellation: the response stream is now unusable
            self._drop()
            raise
        finally:
            self._waiter = None

    def close(self) -> None:
        self._fail(ConnectionAbortedError("connection closed by the client"))

    # -- internals -------------------------------------------------------------------------------------

    # The deadline timer is lazy: rather than a timer per request (created, then cancelled: cancelled timers
    # pile up in the loop's heap until it is compacted), one timer per connection stays armed across requests
    # and, when it fires before the current request's deadline, re-arms itself for that deadline.

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # idle: the next request arms a new timer
        if self._timer_at >= self._deadline:
            self._fail(TimeoutError())
        else:
            self._arm(self._deadline)

    def _drop(self) -> None:
        """Close without waiting for anything (abort: no lingering half-read response)."""
        self.closed = True
        self._state = _IDLE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._drop()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _closed_by_peer(self, exc: Exception | None) -> None:
        self.closed = True
        state, self._state = self._state, _IDLE
        waiter = self._waiter
        if waiter is None or waiter.done() or state == _IDLE:
            return
        if state == _TO_EOF:
            self._finish(bytes(self._body))
        elif not self._received:
            error = ServerDisconnected("connection closed before the response" + (f": {exc}" if exc else ""))
            waiter.set_exception(error)
        else:
            waiter.set_exception(ProtocolError("connection closed in the middle of the response"))

    def _parse(self, buf: bytearray, end: int) -> int:
        """Consume `buf[:end]` as far as possible; returns how many bytes were consumed."""
        with memoryview(buf) as view:  # slices of a memoryview copy once; bytearray slices cost ~7x more
            return self._consume(buf, view, end)

    def _consume(self, buf: bytearray, view: memoryview, end: int) -> int:
        pos = 0
        while pos < end:
            state = self._state
            if state == _HEAD:
                # Resume the search where the previous read left off (minus a partial terminator).
                head_end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3) if pos == 0 else pos, end)
                if head_end < 0:
                    if end - pos > MAX_HEAD:
                        raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
                    self._scanned = end - pos
                    break
                self._scanned = 0
                self._head(view[pos:head_end].tobytes())
                pos = head_end + 4
            elif state == _LENGTH:
                take = min(self._remaining, end - pos)
                if self._filled < 0 and take == self._remaining:  # the whole body is here: one copy
                    pos += take
                    self._complete(view[pos - take : pos].tobytes())
                    continue
                if self._filled < 0:  # the rest of it will be read straight into place
                    self._body = bytearray(self._remaining)
                    self._filled = 0
                self._body[self._filled : self._filled + take] = view[pos : pos + take]
                pos += take
                self._filled += take
                self._remaining = len(self._body) - self._filled
                if not self._remaining:
                    self._complete(bytes(self._body))
            elif state == _CHUNK_SIZE:
                line_end = buf.find(b"\r\n", pos, end)
                if line_end < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    break
                size = _chunk_size(view[pos:line_end].tobytes())
                pos = line_end + 2
                if size == 0:
                    self._state = _TRAILERS
                else:
                    if len(self._body) + size > self.max_body:
                        raise BodyTooLarge(f"chunked body larger than {self.max_body} bytes")
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                self._body += view[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if end - pos < 2:
                    break
                if buf[pos] != 13 or buf[pos + 1] != 10:  # CR LF
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:  # trailer lines (ignored) up to an empty line
                line_end = buf.find(b"\r\n", pos, end)
                if line_end < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise ProtocolError("trailer line too long")
                    break
                empty = line_end == pos
                pos = line_end + 2
                if empty:
                    self._complete(bytes(self._body))
            elif state == _TO_EOF:
                if len(self._body) + end - pos > self.max_body:
                    raise BodyTooLarge(f"body larger than {self.max_body} bytes")
                self._body += view[pos:end]
                pos = end
            else:  # _IDLE: a complete response followed by more bytes
                self._drop()
                pos = end
        return pos

    def _head(self, head: bytes) -> None:
        """Parse the status line and headers; choose how the body is delimited."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ProtocolError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                connection = value.strip().lower()
        if 100 <= status < 200:  # interim response (100 Continue, 103 Early Hints): the real one follows
            self._state = _HEAD
            return
        self._status = status
        self._body = bytearray()
        self._filled = -1
        if parts[0] == b"HTTP/1.0":
            self._keep_alive = b"keep-alive" in connection
        else:
            self._keep_alive = b"close" not in connection
        if status in (204, 304):
            self._complete(b"")
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length > self.max_body:
                raise BodyTooLarge(f"Content-Length {length} larger than {self.max_body} bytes")
            self._remaining = length
            self._state = _LENGTH
            if not length:
                self._complete(b"")
        else:
            self._keep_alive = False
            self._state = _TO_EOF

    def _complete(self, body: bytes) -> None:
        self.responses += 1
        self._state = _IDLE
        self._body = bytearray()
        self._filled = -1
        if not self._keep_alive:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._finish(body)

    def _finish(self, body: bytes) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body))


def _chunk_size(line: bytes) -> int:
    size = line.partition(b";")[0].strip()
    if not size or len(size) > 16:
        raise ProtocolError(f"bad chunk size {line[:40]!r}")
    try:
        return int(size, 16)
    except ValueError:
        raise ProtocolError(f"bad chunk size {line[:40]!r}") from None


class KeepAliveGet:
    """GET `http://{host}:{port}{path}` repeatedly over one persistent connection.

    `await get(timeout)` returns (status, body); `close()` drops the connection (a later `get` reconnects).
    Not for concurrent use: callers serialize requests (the scraper holds one lock per endpoint).
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/metrics",
        *,
        max_body: int = MAX_BODY,
        accept: str = "text/plain",
    ) -> None:
        self.host, self.port, self.max_body = host, port, max_body
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: {accept}\r\n\r\n".encode(
            "latin-1"
        )
        self._conn: _Connection | None = None
        self.connects = 0  # connections opened (tests and diagnostics)
        self.retries = 0  # requests retried on a new connection after a reused one died

    @classmethod
    def for_address(cls, address: str, path: str = "/metrics", **kwargs: int | str) -> KeepAliveGet:
        """From "host:port" or "[v6]:port" (ValueError if malformed)."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad address {address!r}: expected host:port")
        return cls(host.removeprefix("[").removesuffix("]"), int(port), path, **kwargs)  # type: ignore[arg-type]

    async def get(self, timeout: float) -> tuple[int, bytes]:
        """One GET within `timeout` seconds, connecting included.

        Raises TimeoutError, OSError (ConnectionRefusedError, ServerDisconnected, ...) or HttpGetError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(2):
            conn = self._conn
            reused = conn is not None and not conn.closed and conn.loop is loop
            if not reused:
                self.close()
                conn = await self._connect(loop, deadline)
            assert conn is not None
            try:
                return await conn.request(self._request, deadline)
            except ServerDisconnected:
                # The server closed a kept-alive connection as we reused it: retry once, on a new one.
                if not reused or attempt:
                    self.close()
                    raise
                self.retries += 1
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        conn = _Connection(loop, self.max_body)
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(lambda: conn, self.host, self.port)
        self._conn = conn
        self.connects += 1
        return conn

    def close(self) -> None:
        """Drop the connection, if any (abort: immediate, nothing to wait for)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
