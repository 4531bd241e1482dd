"""What a client can make the picker hold, each limit enforced (LimitsConfig): body size, bytes buffered by
all streams, open streams, the time to deliver a request body (slow drip); and what the wire does with
sequences Envoy never sends. Driven without sockets; timeouts on a virtual clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from support.extproc import (
    BUFFERED,
    header_values,
    make_director,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from support.virtual_time import run_virtual

from epp.extproc.servicer import BodyBudget, ExtProcServicer, RequestStream

CHAT_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}]}'


def servicer_for(**limits: Any) -> ExtProcServicer:
    director = make_director(limits=limits)
    return ExtProcServicer(director, director.config.limits, director.config.response)


def code_of(reply: pb.ProcessingResponse) -> tuple[int, str]:
    immediate = reply.immediate_response
    return immediate.status.code, json.loads(immediate.body)["error"]["code"]


async def script(
    messages: list[pb.ProcessingRequest], then: asyncio.Event | None = None
) -> AsyncIterator[Any]:
    """Envoy's side: the messages, then (with `then`) nothing until `then` is set."""
    for message in messages:
        yield message
        await asyncio.sleep(0)
    if then is not None:
        await then.wait()


async def collect(
    servicer: ExtProcServicer, messages: Any, context: Any = None
) -> list[pb.ProcessingResponse]:
    """The replies as messages (echoed response chunks come pre-serialized)."""
    return [
        pb.ProcessingResponse.FromString(r) if isinstance(r, bytes) else r
        async for r in servicer.Process(messages, context)
    ]


def test_a_chunk_past_the_body_limit_is_never_kept() -> None:
    director = make_director(limits={"max_body_bytes": 2048})
    budget = BodyBudget(1 << 20)
    stream = RequestStream(director, director.config.limits, budget=budget)
    stream.handle(request_headers())
    stream.handle(request_body(b"x" * 2000, False))
    assert stream.buffered_bytes == 2000 and budget.used == 2000
    (reply,) = stream.handle(request_body(b"y" * 100_000, False))
    assert code_of(reply) == (413, "body_too_large") and stream.done
    assert stream.buffered_bytes == 0 and budget.used == 0  # the big chunk was never appended, the rest freed


def test_bodies_being_collected_share_one_budget() -> None:
    director = make_director(limits={"max_body_bytes": 4096, "max_buffered_bytes": 4096})
    budget = BodyBudget(4096)
    first = RequestStream(director, director.config.limits, budget=budget)
    second = RequestStream(director, director.config.limits, budget=budget)
    first.handle(request_headers())
    second.handle(request_headers())
    assert list(first.handle(request_body(CHAT_BODY[:20] + b" " * 3000, False))) == []
    (reply,) = second.handle(request_body(b" " * 2000, False))
    assert code_of(reply) == (503, "buffers_full")
    assert json.loads(reply.immediate_response.body)["error"]["message"].count("max_buffered_bytes") == 1
    assert budget.used == 3020  # the refused chunk was not counted
    first.close()  # e.g. the client went away mid-body
    assert budget.used == 0


def test_the_limit_on_open_streams_answers_503_and_ends_the_extra_stream() -> None:
    async def main() -> None:
        servicer = servicer_for(max_streams=1)
        hold = asyncio.Event()
        first = asyncio.ensure_future(collect(servicer, script([request_headers()], hold)))
        await asyncio.sleep(0.001)
        assert servicer.active_streams == 1
        replies = await collect(servicer, script([request_headers({"x-request-id": "r-2"})], asyncio.Event()))
        assert [code_of(r) for r in replies] == [(503, "too_many_streams")]
        headers = header_values(replies[0].immediate_response.headers)
        assert (
            headers["x-request-id"] == "r-2"
            and headers["x-llm-d-request-dropped-reason"] == "too_many_streams"
        )
        assert (servicer.refused, servicer.active_streams) == (1, 1)
        hold.set()
        await first
        assert servicer.active_streams == 0
        # Room again: the next stream is served.
        replies = await collect(servicer, script([request_headers(), request_body(CHAT_BODY, True)]))
        assert replies[0].WhichOneof("response") == "request_headers"

    run_virtual(main())


@pytest.mark.parametrize("mode", ["duplex", "buffered", "silent"])
def test_a_body_that_does_not_arrive_in_time_is_408_at_the_deadline(mode: str) -> None:
    """Slow drip (a few bytes, then nothing; or nothing at all after the headers): exactly body_timeout_s
    after the stream started, 408 body_timeout, the stream ends, nothing is held."""

    async def main() -> None:
        servicer = servicer_for(body_timeout_s=7.5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        if mode == "duplex":
            messages = [request_headers(), request_body(b'{"mod', False), request_body(b"el", False)]
        elif mode == "buffered":  # Envoy buffers the body itself: the picker answers the headers at once
            messages = [request_headers(mode=BUFFERED)]
        else:
            messages = []
        replies = await collect(servicer, script(messages, asyncio.Event()))
        assert loop.time() - start == 7.5
        assert code_of(replies[-1]) == (408, "body_timeout")
        assert "limits.body_timeout_s" in json.loads(replies[-1].immediate_response.body)["error"]["message"]
        if mode == "buffered":
            assert replies[0].WhichOneof("response") == "request_headers"
        assert servicer.active_streams == 0 and servicer.budget.used == 0
        assert all(e.inflight_requests == 0 for e in servicer.director.pool)

    run_virtual(main())


def test_the_deadline_covers_only_the_request_side() -> None:
    """Once decided, the stream follows the response however long the model server takes."""

    async def main() -> None:
        servicer = servicer_for(body_timeout_s=1.0)
        director = servicer.director
        late = asyncio.Event()

        async def envoy() -> AsyncIterator[Any]:
            yield request_headers()
            yield request_body(CHAT_BODY, True)
            await asyncio.sleep(60)  # the model server queues the request for a minute
            yield response_headers(200)
            yield response_body(b"data: 1\n\n", True)
            late.set()

        replies = await collect(servicer, envoy())
        assert late.is_set()
        assert [r.WhichOneof("response") for r in replies][:3] == [
            "request_headers",
            "request_body",
            "response_headers",
        ]
        assert all(e.inflight_requests == 0 for e in director.pool)

    run_virtual(main())


def test_the_stream_ends_after_a_rejection() -> None:
    async def main() -> None:
        servicer = servicer_for()
        asked = []

        async def envoy() -> AsyncIterator[Any]:
            for message in [request_headers(), request_body(b"{oops", True), request_body(b"more", True)]:
                asked.append(message)
                yield message

        replies = await collect(servicer, envoy())
        assert [code_of(r) for r in replies] == [(400, "bad_request")]
        assert len(asked) == 2  # nothing read after the ImmediateResponse

    run_virtual(main())


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_request_headers_twice_end_the_stream_with_invalid_argument_and_leak_nothing() -> None:
    """Found by the fuzz tests: a second request_headers (bodyless both times) made a second decision, and
    the first one's in-flight count was never released."""

    async def main() -> None:
        servicer = servicer_for()
        context = Context()
        bodyless = request_headers({":method": "GET"}, path="/v1/models", end_of_stream=True)
        with pytest.raises(grpc.aio.AbortError):
            await collect(servicer, script([bodyless, bodyless]), context)
        assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert servicer.violations == 1 and servicer.active_streams == 0
        assert all(e.inflight_requests == 0 for e in servicer.director.pool)

    run_virtual(main())


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("a" * 256, True),
        ("a" * 257, False),
        ("a\r\nx-evil: 1", False),
        ("caf\u00e9", False),
        ("", False),
    ],
)
def test_an_unusable_request_id_is_replaced(sent: str, kept: bool) -> None:
    director = make_director()
    stream = RequestStream(director, director.config.limits)
    stream.handle(request_headers({"x-request-id": sent}))
    replies = list(stream.handle(request_body(CHAT_BODY, True)))
    headers = header_values(replies[0].request_headers.response.header_mutation)
    if kept:
        assert "x-request-id" not in headers and stream.decision.request.request_id == sent
    else:
        assert (
            len(headers["x-request-id"]) == 32
            and stream.decision.request.request_id == headers["x-request-id"]
        )
    stream = RequestStream(director, director.config.limits)
    stream.handle(request_headers({"x-request-id": sent}))
    (reply,) = stream.handle(request_body(b"{", True))
    echoed = header_values(reply.immediate_response.headers).get("x-request-id")
    assert echoed == (sent if kept else None)
