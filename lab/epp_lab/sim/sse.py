"""The SSE writer of a streamed request: one `data:` event per wake-up of the handler, headers with the first.

The replica's driver wakes the handler (`woke`) for a request's first token, its last, and otherwise every
`stream_interval` tokens (`SimRequest.notified`); each wake-up sends the tokens not sent yet as one event.
The first event carries exactly the first token, however late the writer runs, and the response headers
leave with it, so a client's time to first byte is the simulated TTFT.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from epp_lab.sim import openai
from epp_lab.sim.engine import FINISHED, SimRequest
from epp_lab.sim.replica import Replica


def event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def stream(
    request: web.Request,
    replica: Replica,
    port: int,
    woke: asyncio.Event,
    gen: openai.Generation,
    reqs: list[SimRequest],
    offsets: list[int],
    rid: str,
    created: int,
) -> web.StreamResponse:
    """Write the stream of `reqs` (one choice each) until every one finished; returns the response."""
    chat, model = gen.chat, gen.model
    obj = openai.chunk_object(chat)
    sent = [0] * len(reqs)
    resp: web.StreamResponse | None = None
    while True:
        await woke.wait()
        woke.clear()
        parts: list[bytes] = []
        for i, r in enumerate(reqs):
            upto = r.notified
            if upto <= sent[i]:
                continue
            if sent[i] == 0:
                # The first event carries exactly the first token, however late this writer runs, so
                # the first byte a client sees is the first token (TTFT), never a batch of them.
                upto = 1
            text = replica.output_text(offsets[i], sent[i], upto)
            finish = "length" if r.state == FINISHED and upto >= r.generated else None
            choice = openai.chunk_choice(chat, i, text, sent[i] == 0, finish)
            sent[i] = upto
            parts.append(event({"id": rid, "object": obj, "created": created, "model": model,
                                "choices": [choice]}))  # fmt: skip
        done = all(r.state == FINISHED and sent[i] >= r.generated for i, r in enumerate(reqs))
        if done:
            if gen.include_usage:
                parts.append(event({"id": rid, "object": obj, "created": created, "model": model,
                                    "choices": [], "usage": openai.usage(reqs)}))  # fmt: skip
            parts.append(DONE)
        if resp is None:
            # Headers leave with the first token: time to first byte = TTFT.
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "x-sim-replica": str(port),
                }
            )
            await resp.prepare(request)
        if parts:
            await resp.write(b"".join(parts))
        if any(r.notified > sent[i] for i, r in enumerate(reqs)):
            woke.set()  # tokens held back behind a first event go out in the next one
        if done:
            await resp.write_eof()
            return resp
