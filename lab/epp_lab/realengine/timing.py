"""When does a streamed vLLM response send its HTTP headers: before the first token, or with it?

The picker takes a request's time to first token from the first response *body* chunk it sees, not from
the headers. `stream_timing` measures, over a raw socket, the time from the request's last byte to the
response's status line and headers, and to its first body bytes, for a prompt whose prefill takes a while.
If the headers arrived as early as a short prompt's do while the first body chunk waited for the prefill,
headers go out before the first token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass


@dataclass(slots=True)
class StreamTiming:
    path: str
    prompt_chars: int
    headers_s: float  # request sent -> end of the response headers
    first_body_s: float  # request sent -> first body bytes
    first_body: str  # the first body bytes (up to 200)

    @property
    def headers_lead_s(self) -> float:
        """How much earlier than the first body bytes the headers arrived."""
        return self.first_body_s - self.headers_s


async def stream_timing(
    address: str, path: str, body: dict[str, object], timeout: float = 120.0
) -> StreamTiming:
    """POST `body` (streamed) to `address` + `path`; times of the headers and of the first body bytes."""
    host, port = address.rsplit(":", 1)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head + payload)
            await writer.drain()
            sent = time.perf_counter()
            await reader.readuntil(b"\r\n\r\n")
            headers = time.perf_counter()
            first = await reader.read(200)
            first_body = time.perf_counter()
            await reader.read()  # drain the rest of the stream
        finally:
            writer.close()
    prompt = body.get("prompt") or json.dumps(body.get("messages"))
    return StreamTiming(
        path, len(str(prompt)), headers - sent, first_body - sent, first.decode(errors="replace")
    )
