"""Helpers of the fault tests (tests/integration/test_faults.py): a model-server stand-in whose /metrics page
can hang, fail or turn to garbage, a gateway filter that pins a request to one endpoint, a raw HTTP client
that can vanish mid-request, SSE streams read as they arrive, and a poll under a hang guard.

Nothing here times anything for an assertion: `until` waits for a condition (failing with a message only if
it never holds within the hang guard) and returns the moment it saw it, so that tests can *print* how long a
recovery took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from support.upstream import Upstream

HANG_GUARD_S = 60.0
"""Longest wait for any event or condition; only ever reached when something is broken."""
POLL_S = 0.005

METRICS_FAULTS = ("hang", "error", "garbage")
GARBAGE = random.Random(7).randbytes(4096)  # a /metrics page of random bytes (the same every run)


async def until(condition: Callable[[], bool], what: str, guard: float = HANG_GUARD_S) -> float:
    """Poll `condition` every few ms until it holds; return `time.perf_counter()` at that moment. Fails with
    `what` if it never holds within the hang guard (a guard, not a timing)."""
    try:
        async with asyncio.timeout(guard):
            while not condition():
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"gave up waiting ({guard:g} s hang guard): {what}") from None
    return time.perf_counter()


class FaultyUpstream(Upstream):
    """An `Upstream` whose /metrics page misbehaves while `metrics_fault` is set: "hang" (never answers
    until the fault is cleared), "error" (HTTP 500) or "garbage" (200 with random bytes). Its inference
    paths keep working: only the picker's view of it is broken."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fault: str | None = None
        self._unhang = asyncio.Event()

    @property
    def metrics_fault(self) -> str | None:
        return self._fault

    @metrics_fault.setter
    def metrics_fault(self, fault: str | None) -> None:
        if fault is not None and fault not in METRICS_FAULTS:
            raise ValueError(f"unknown metrics fault {fault!r}")
        self._fault = fault
        if fault == "hang":
            self._unhang = asyncio.Event()
        else:
            self._unhang.set()  # hanging scrapes answer (normally) once the fault is cleared

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._fault == "hang":
            await self._unhang.wait()
        if self._fault == "error":
            return web.Response(status=500, text="internal error\n")
        if self._fault == "garbage":
            return web.Response(body=GARBAGE, content_type="text/plain")
        return await super()._metrics(request)

    async def stop(self) -> None:
        self._unhang.set()
        await super().stop()


def chat(content: str, stream: bool = False, max_tokens: int = 8, model: str = "m") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return body


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """POST a chat completion through Envoy: (status, response headers, body text)."""
    async with asyncio.timeout(HANG_GUARD_S):
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.text()


class Stream:
    """A streamed completion read as it arrives. `started` is set once `events` SSE events arrived; `result`
    is (status, text received, error or None) when it ended, however it ended."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
        events: int = 2,
    ) -> None:  # fmt: skip
        self.started = asyncio.Event()
        self.status = 0
        self.text = ""
        self.served_by: str | None = None  # the simulator's x-sim-replica header (its port)
        self._events = events
        self.task = asyncio.ensure_future(self._run(session, url, body, headers))

    async def _run(
        self, session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, str, BaseException | None]:
        error: BaseException | None = None
        try:
            async with asyncio.timeout(HANG_GUARD_S):
                async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    self.status = r.status
                    self.served_by = r.headers.get("x-sim-replica")
                    async for chunk in r.content.iter_any():
                        self.text += chunk.decode()
                        if self.text.count("\n\n") >= self._events:
                            self.started.set()
        except (aiohttp.ClientError, ConnectionError) as err:
            error = err
        finally:
            self.started.set()  # a stream that ended early has "started" too: the test sees how it ended
        return self.status, self.text, error

    @property
    def complete(self) -> bool:
        """Ended normally: status 200 and the final `data: [DONE]` event."""
        return self.status == 200 and self.text.endswith("data: [DONE]\n\n")


async def open_request(port: int, body: bytes, declared: int, path: str = "/v1/chat/completions") -> Any:
    """Send the head of a POST declaring `declared` body bytes and the first `body` bytes of it, then stop:
    a client in the middle of its request body. Returns the writer (close it to vanish)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_head(port, path, declared) + body)
    await writer.drain()
    return writer


async def send_request(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    """Send a whole POST on a raw connection; returns (reader, writer): read what comes, or vanish."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post_head(port, path, len(data)) + data)
    await writer.drain()
    return reader, writer


def post_head(port: int, path: str, content_length: int) -> bytes:
    """The head of a JSON POST on a raw HTTP/1.1 connection."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {content_length}\r\n\r\n"
    ).encode()


async def read_until(reader: Any, marker: bytes) -> bytes:
    """Read a raw response until `marker` has arrived (under the hang guard)."""
    seen = b""
    async with asyncio.timeout(HANG_GUARD_S):
        while marker not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                raise AssertionError(f"the connection ended before {marker!r}: {seen[-300:]!r}")
            seen += chunk
    return seen


async def vanish(writer: Any) -> None:
    """Close a raw client connection abruptly (RST, as a killed client's kernel would)."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        import socket
        import struct

        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of an SSE body's `data:` events (without `[DONE]`)."""
    out = []
    for event in text.split("\n\n"):
        if event.startswith("data: ") and event != "data: [DONE]":
            with contextlib.suppress(ValueError):
                out.append(json.loads(event.removeprefix("data: ")))
    return out
