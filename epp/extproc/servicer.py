"""The Envoy ext_proc servicer: one bidirectional stream per HTTP request.

Request side, by the body mode Envoy announces in `protocol_config` on the first message:

* FULL_DUPLEX_STREAMED: collect body chunks without replying; at end of body (or at trailers) decide, then
  reply in order: headers (decision, `clear_route_cache`), the body as ≤ 62,000-byte `streamed_response`
  chunks (the last with `end_of_stream`, unless trailers follow), then trailers.
* BUFFERED (and anything else): reply to the headers at once (deferring would deadlock Envoy), then
  decide on the single buffered body message and carry the decision on the body reply.
* headers with `end_of_stream` (no body): decide at once on load alone.

Response side, by the response body mode Envoy announces (the picker never changes the response):

* FULL_DUPLEX_STREAMED: every chunk must be echoed (`streamed_response`, pre-serialized: the per-token cost);
  the stream is followed to its end.
* STREAMED (and BUFFERED, asked to become STREAMED with `mode_override`): chunks are acknowledged; with
  `response.follow: first-byte` the picker ends its gRPC stream when the first chunk arrives, and Envoy
  passes that chunk and the rest of the response through without it (safe in these modes: Envoy keeps the
  chunks; never in FULL_DUPLEX_STREAMED, where it would lose them).
* NONE: only the response headers (and trailers, if sent) reach the picker.

The first response body chunk is reported to the director (time to first token); the picker's end of
following the request (response done, stopped early, client gone, or Envoy cancelling) is reported exactly
once (`Director.finished` releases the in-flight count).

Flow control may hold a request at the decision (the pool is saturated): `handle` then returns a `Wait`
instead of replies. The servicer sends its `interim` replies (BUFFERED, with `flow_control.
extend_message_timeout`: `override_message_timeout`, since Envoy's `message_timeout` bounds the reply to a
buffered body; without it the wait is capped below that timeout), awaits `ready` (the held request's outcome;
nothing else is raced: when Envoy resets the stream, grpc cancels `Process` and `close` frees the queue slot
at once), then sends `stream.resume()`: the decision replies, or the rejection, in the order they would have
had at once. In FULL_DUPLEX_STREAMED mode Envoy puts no deadline on the reply; the flow-control TTL does.

Limits (`LimitsConfig`; README "Security and threat model"): a body chunk that would take the request past
`max_body_bytes` (413), or all streams' collected bodies past `max_buffered_bytes` (503 `buffers_full`), is
never kept; the request side must be complete within `body_timeout_s` of the stream's start (408
`body_timeout`: the servicer bounds each read until then); beyond `max_streams` open streams a new stream is
answered 503 `too_many_streams` on its first message and ended. After any rejection the servicer ends the
stream (Envoy sends nothing more after an ImmediateResponse). A second `request_headers` on one stream is not
a request Envoy sends: the stream ends with gRPC INVALID_ARGUMENT rather than mixing two requests' state.
Control headers the config does not trust (`security.trusted_control_headers`) are dropped before the
director sees the headers, and removed from the request that goes upstream; an unusable `x-request-id`
(control characters, non-ASCII, over 256 characters) is replaced by a generated one.

`RequestStream.handle` is synchronous and pure wire logic, so unit tests drive it with scripted messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.config import LimitsConfig, ResponseConfig
from epp.errors import Rejection
from epp.extproc import messages as msg
from epp.flowcontrol.queues import QueuedRequest
from epp.requestcontrol.director import Decision, Director
from epp.requestcontrol.headers import REQUEST_ID, valid_request_id

log = logging.getLogger(__name__)

_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED = ProcessingMode.BUFFERED
_NO_RESPONSES: tuple[pb.ProcessingResponse, ...] = ()
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _subset_hint(metadata: Any) -> frozenset[str] | None:
    """`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`: a list of ip:port, or one
    comma-separated string (some gateways). Absent → None."""
    namespace = metadata.filter_metadata.get(msg.SUBSET_METADATA_NAMESPACE)
    if namespace is None or msg.SUBSET_METADATA_KEY not in namespace.fields:
        return None
    value = namespace.fields[msg.SUBSET_METADATA_KEY]
    kind = value.WhichOneof("kind")
    items: list[str] = []
    if kind == "list_value":
        for item in value.list_value.values:
            items.extend(item.string_value.split(","))
    elif kind == "string_value":
        items = value.string_value.split(",")
    return frozenset(a.strip() for a in items if a.strip())


def _served_endpoint(metadata: Any) -> str | None:
    namespace = metadata.filter_metadata.get(msg.DESTINATION_METADATA_NAMESPACE)
    if namespace is None:
        return None
    value = namespace.fields.get(msg.SERVED_METADATA_KEY)
    if value is None or not value.string_value:
        return None
    return value.string_value.split(",")[0].strip()


class Wait:
    """`RequestStream.handle`'s answer while flow control holds the request: send `interim`, await `ready`,
    then send `RequestStream.resume()`."""

    __slots__ = ("interim", "ready")

    def __init__(self, ready: Awaitable[None], interim: tuple[pb.ProcessingResponse, ...] = ()) -> None:
        self.ready = ready
        self.interim = interim


Replies = tuple[pb.ProcessingResponse, ...] | list[pb.ProcessingResponse]


class BodyBudget:
    """Request-body bytes all streams of a servicer are collecting, against `limits.max_buffered_bytes`."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class RequestStream:
    """State of one ext_proc stream (one HTTP request)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_budget",
        "_buffered",
        "_decided",
        "_duplex",
        "_held",
        "_removed",
        "_response_mode",
        "_seen_headers",
        "_status",
        "_streamed_override",
        "_undispatched",
        "decision",
        "director",
        "done",
        "headers",
        "limits",
        "stopped_early",
        "subset",
        "violation",
    )

    def __init__(
        self,
        director: Director,
        limits: LimitsConfig,
        response: ResponseConfig | None = None,
        budget: BodyBudget | None = None,
    ) -> None:
        self.director = director
        self.limits = limits
        self.headers: dict[str, str] = {}
        self.subset: frozenset[str] | None = None
        self.decision: Decision | None = None
        self.done = False  # the picker needs no further message: the servicer ends the gRPC stream
        self.stopped_early = False  # done after the first response chunk (response.follow: first-byte)
        self.violation: str | None = None  # a sequence Envoy never sends: end the stream with an error
        self._budget = budget
        self._buffered = 0  # bytes of `_body` counted in `_budget`
        self._seen_headers = False
        self._removed: list[str] = []  # untrusted request headers present: removed from the upstream request
        self._duplex = False
        self._response_mode = _FULL_DUPLEX  # until Envoy says otherwise (protocol_config)
        self._streamed_override = (response or ResponseConfig()).streamed_override
        self._body: list[bytes] = []
        self._body_size = 0
        self._decided = False
        self._undispatched: Decision | None = None  # decided; the reply has not been sent yet
        self._status = 0  # upstream :status once seen; 0 = none (yet)
        # Held by flow control: (ticket, body, headers_reply, end_of_stream, trailers) until `resume`.
        self._held: tuple[QueuedRequest, bytes | None, bool, bool, bool] | None = None

    # -- dispatch ---------------------------------------------------------------------------------------
    def handle(self, message: pb.ProcessingRequest) -> Replies | Wait:
        if self._undispatched is not None:
            self.dispatched()
        kind = message.WhichOneof("request")
        if kind == "request_body":
            return self._on_request_body(message.request_body)
        if kind == "response_body":
            return self._on_response_body(message.response_body)
        if kind == "request_headers":
            return self._on_request_headers(message)
        if kind == "response_headers":
            return self._on_response_headers(message)
        if kind == "request_trailers":
            return self._on_request_trailers()
        if kind == "response_trailers":
            self.close()
            return (msg.RESPONSE_TRAILERS_CONTINUE,)
        log.warning("ext_proc: ignoring unexpected message %r", kind)
        return _NO_RESPONSES

    # -- request side -----------------------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        """The request side is not complete yet (no decision, no rejection): `limits.body_timeout_s` runs."""
        return not self._decided

    @property
    def buffered_bytes(self) -> int:
        """Request-body bytes this stream holds while collecting (at most `limits.max_body_bytes`)."""
        return self._body_size if not self._decided else 0

    def _on_request_headers(self, message: pb.ProcessingRequest) -> Any:
        if self._seen_headers or self._decided:
            # Envoy sends the request headers once, first: anything else would mix two requests' state.
            self.violation = "request_headers received twice, or after the request body"
            self.done = True
            return _NO_RESPONSES
        self._seen_headers = True
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self._duplex = config.request_body_mode == _FULL_DUPLEX
            self._response_mode = config.response_body_mode
        headers = self.headers
        for header in message.request_headers.headers.headers:
            headers[header.key] = (
                header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
            )
        for name in self.director.untrusted_headers:
            if name in headers:
                del headers[name]
                self._removed.append(name)
        request_id = headers.get(REQUEST_ID)
        if request_id is not None and not valid_request_id(request_id):
            del headers[REQUEST_ID]  # the director generates one and sets it upstream
        if message.HasField("metadata_context"):
            self.subset = _subset_hint(message.metadata_context)
        if message.request_headers.end_of_stream:
            return self._decide(body=None, headers_reply=True, end_of_stream=True)
        if not self._duplex:
            return (msg.REQUEST_HEADERS_CONTINUE,)
        return _NO_RESPONSES

    def _on_request_body(self, body: pb.HttpBody) -> Any:
        if self._decided:  # Envoy should not send more body after we decided; answer in shape anyway.
            return _NO_RESPONSES
        chunk = body.body
        self._body_size += len(chunk)
        if self._body_size > self.limits.max_body_bytes:
            self.count_rejection("body_too_large")
            return self._reject(
                Rejection(
                    413,
                    "body_too_large",
                    f"request body exceeds the limit of {self.limits.max_body_bytes} bytes "
                    "(limits.max_body_bytes)",
                )
            )
        if chunk:
            budget = self._budget
            if budget is not None:
                if budget.used + len(chunk) > budget.limit:
                    self.count_rejection(BUFFERS_FULL)
                    return self._reject(
                        Rejection(
                            503,
                            BUFFERS_FULL,
                            "the endpoint picker is collecting too many request bodies at once "
                            f"({budget.limit} bytes, limits.max_buffered_bytes); retry later",
                        )
                    )
                budget.used += len(chunk)
                self._buffered += len(chunk)
            self._body.append(chunk)
        if body.end_of_stream or not self._duplex:
            return self._decide(body=b"".join(self._body), headers_reply=self._duplex, end_of_stream=True)
        return _NO_RESPONSES

    def _on_request_trailers(self) -> Any:
        if self._duplex and not self._decided:
            return self._decide(
                body=b"".join(self._body), headers_reply=True, end_of_stream=False, trailers=True
            )
        return (msg.REQUEST_TRAILERS_CONTINUE,)

    def _decide(
        self, body: bytes | None, headers_reply: bool, end_of_stream: bool, trailers: bool = False
    ) -> Replies | Wait:
        self._decided = True
        self._body = []
        self._release_buffer()
        timed = not self._duplex  # Envoy's message_timeout bounds the reply (BUFFERED, or headers-only)
        try:
            outcome = self.director.decide(self.headers, body, self.subset, timed=timed)
        except Rejection as rejection:
            return self._reject(rejection)
        except Exception:  # our bug: answer 500 for this request only, keep serving the others
            log.exception("ext_proc: internal error while deciding request %s", self.headers.get(REQUEST_ID))
            return self._reject(Rejection(500, "internal_error", "internal error in the endpoint picker"))
        if outcome.__class__ is not Decision:  # held by flow control
            assert isinstance(outcome, QueuedRequest)
            self._held = (outcome, body, headers_reply, end_of_stream, trailers)
            extend = timed and self.director.extend_message_timeout
            interim = (msg.override_message_timeout(outcome.ttl + 1.0),) if extend else ()
            return Wait(outcome.ready, interim)
        assert isinstance(outcome, Decision)
        return self._decision_replies(outcome, body, headers_reply, end_of_stream, trailers)

    def resume(self) -> Replies:
        """The replies of a held request once its `Wait` is over: the decision, or the rejection."""
        held, self._held = self._held, None
        assert held is not None, "resume without a held request"
        item, body, headers_reply, end_of_stream, trailers = held
        try:
            decision = self.director.resume(item)
        except Rejection as rejection:
            return self._reject(rejection)
        except Exception:
            log.exception("ext_proc: internal error while resuming request %s", self.headers.get(REQUEST_ID))
            return self._reject(Rejection(500, "internal_error", "internal error in the endpoint picker"))
        return self._decision_replies(decision, body, headers_reply, end_of_stream, trailers)

    def _decision_replies(
        self, decision: Decision, body: bytes | None, headers_reply: bool, end_of_stream: bool, trailers: bool
    ) -> Replies:
        self.decision = self._undispatched = decision
        headers = decision.response_headers()
        if body is None:  # bodyless
            return (self._strip(msg.decision_headers_response(headers, decision.destination)),)
        if headers_reply:  # FULL_DUPLEX_STREAMED
            out = [self._strip(msg.decision_headers_response(headers, decision.destination))]
            new_body = decision.new_body if decision.new_body is not None else body
            out.extend(msg.streamed_request_body(new_body, self.limits.body_chunk_bytes, end_of_stream))
            if trailers:
                out.append(msg.REQUEST_TRAILERS_CONTINUE)
            return out
        return (self._strip(msg.decision_body_response(headers, decision.destination, decision.new_body)),)

    def _strip(self, reply: pb.ProcessingResponse) -> pb.ProcessingResponse:
        """Remove the untrusted control headers the request carried from the request going upstream."""
        if self._removed:
            side = reply.request_headers if reply.HasField("request_headers") else reply.request_body
            side.response.header_mutation.remove_headers.extend(self._removed)
        return reply

    def _reject(self, rejection: Rejection) -> tuple[pb.ProcessingResponse, ...]:
        self._decided = True
        self._body = []
        self._release_buffer()
        self._status = rejection.status
        self.done = True  # Envoy ends the request with our reply: nothing more to follow
        return (msg.immediate(rejection, self.headers.get(REQUEST_ID)),)

    def count_rejection(self, code: str) -> None:
        """Count a rejection the wire decided (the director counts its own)."""
        metrics = self.director.metrics
        if metrics is not None:  # no model is known before the body is complete
            metrics.rejected("", "", code)

    def reject(self, rejection: Rejection) -> tuple[pb.ProcessingResponse, ...]:
        """End the request with `rejection` now (the servicer's stream-level limits)."""
        return self._reject(rejection)

    def _release_buffer(self) -> None:
        if self._buffered:
            assert self._budget is not None
            self._budget.used -= self._buffered
            self._buffered = 0

    # -- response side ----------------------------------------------------------------------------------
    def _on_response_headers(self, message: pb.ProcessingRequest) -> Any:
        for header in message.response_headers.headers.headers:
            if header.key == ":status":
                raw = header.raw_value or header.value.encode()
                self._status = int(raw) if raw.isdigit() else 0
                break
        decision = self.decision
        if decision is not None and message.HasField("metadata_context"):
            served = _served_endpoint(message.metadata_context)
            if served:
                self.director.served_by(decision, served)
        if message.response_headers.end_of_stream:
            self.close()
        elif self._response_mode == _BUFFERED and self._streamed_override:
            return (msg.RESPONSE_HEADERS_CONTINUE_STREAMED,)
        return (msg.RESPONSE_HEADERS_CONTINUE,)

    def _on_response_body(self, body: pb.HttpBody) -> Any:
        decision = self.decision
        if decision is not None and not decision.first_byte:
            self.director.response_started(decision)
        end_of_stream = body.end_of_stream
        if self._response_mode == _FULL_DUPLEX:  # every chunk echoed, to the end
            if end_of_stream:
                self.close()
            return (msg.echo_response_body(body.body, end_of_stream),)
        if end_of_stream:
            self.close()
        elif decision is None or not decision.follow_to_end:
            # Enough: end the stream without answering this chunk. In STREAMED mode Envoy keeps the chunks
            # it handed over and passes them, and the rest of the response, through without the picker
            # (tested through Envoy, also with chunks arriving back to back); not answering first saves the
            # round trip that would hold the next token back.
            self.close(followed_to_end=False)
            self.done = self.stopped_early = True
            return _NO_RESPONSES
        return (msg.RESPONSE_BODY_CONTINUE,)

    # -- end --------------------------------------------------------------------------------------------
    def dispatched(self) -> None:
        """The decision reply has been sent: tell the director (plugins learn the pick). Deferred from the
        decision so the reply leaves first; the servicer calls it right after replying, and it runs before
        this stream's next message is handled in any case."""
        decision, self._undispatched = self._undispatched, None
        if decision is not None:
            self.director.dispatched(decision)

    def close(self, followed_to_end: bool = True) -> None:
        """Idempotent: the picker stops following the request; release the in-flight count, record the
        outcome. A request still held by flow control (the client went away) leaves the queue at once."""
        self._release_buffer()
        if self._held is not None:
            item = self._held[0]
            self._held = None
            self.director.abandon(item)
        self.dispatched()
        decision = self.decision
        if decision is not None:
            self.decision = None
            self.director.finished(decision, self._status, followed_to_end)


def _serialize(reply: pb.ProcessingResponse | bytes) -> bytes:
    """Replies are messages, or already serialized (`messages.echo_response_body`)."""
    return reply if reply.__class__ is bytes else reply.SerializeToString()  # type: ignore[union-attr]


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self, director: Director, limits: LimitsConfig, response: ResponseConfig | None = None
    ) -> None:
        self.director = director
        self.limits = limits
        self.response = response or ResponseConfig()
        self.budget = BodyBudget(limits.max_buffered_bytes)
        self.active_streams = 0
        # Counters for /metrics (plain ints on the hot path; exported at scrape time).
        self.streams = 0
        self.messages = 0  # ProcessingRequests received
        self.stopped_early = 0  # streams the picker ended after the first response chunk
        self.refused = 0  # streams answered 503 too_many_streams (limits.max_streams)
        self.violations = 0  # streams ended for a message sequence Envoy never sends

    def add_to_server(self, server: Any) -> None:
        """Register `Process` with a serializer that passes pre-serialized replies through."""
        handler = grpc.stream_stream_rpc_method_handler(
            self.Process,
            request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=_serialize,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(EXTPROC_SERVICE, {"Process": handler}),)
        )

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse | bytes]:
        limits = self.limits
        deadline = asyncio.get_running_loop().time() + limits.body_timeout_s
        messages = request_iterator.__aiter__()
        if self.active_streams >= limits.max_streams:
            self.refused += 1
            async for reply in self._refuse(messages, deadline):
                yield reply
            return
        stream = RequestStream(self.director, limits, self.response, self.budget)
        self.active_streams += 1
        self.streams += 1
        # One timer per stream bounds the request side (cheaper than a timeout around every read): when it
        # fires during a read, it cancels that read; otherwise the next turn of the loop sees it expired.
        task = asyncio.current_task()
        assert task is not None
        deadline_state = _Deadline(task)
        timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_at(
            deadline, deadline_state.expire
        )
        try:
            while True:
                if deadline_state.expired and stream.collecting:
                    stream.count_rejection(BODY_TIMEOUT)
                    for reply in stream.reject(_body_timeout(limits)):
                        yield reply
                    break
                deadline_state.reading = True
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not deadline_state.cancelled_read or task.uncancel() > 0:
                        raise  # not (only) ours: Envoy reset the stream, or the server is stopping
                    continue  # the deadline passed mid-read: answer 408 at the top of the loop
                finally:
                    deadline_state.reading = False
                self.messages += 1
                replies = stream.handle(message)
                if timer is not None and not stream.collecting:
                    timer.cancel()
                    timer = None
                if replies.__class__ is Wait:  # held by flow control
                    assert isinstance(replies, Wait)
                    for reply in replies.interim:
                        yield reply
                    await replies.ready  # cancelled by grpc if Envoy resets the stream
                    replies = stream.resume()
                for reply in replies:  # type: ignore[union-attr]
                    yield reply
                stream.dispatched()
                if stream.done:
                    if stream.stopped_early:
                        self.stopped_early += 1
                    elif stream.violation is not None:
                        self.violations += 1
                        log.warning("ext_proc: ending a stream: %s", stream.violation)
                        if context is not None:
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.violation)
                    break  # ends the gRPC stream (status OK): Envoy carries on without the picker
        finally:
            # Normal end, stopped early, client disconnect, or cancellation: release exactly once.
            if timer is not None:
                timer.cancel()
            stream.close()
            self.active_streams -= 1

    async def _refuse(
        self, messages: AsyncIterator[pb.ProcessingRequest], deadline: float
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Over `limits.max_streams`: answer the stream's first message 503 too_many_streams, then end it.
        Nothing is kept; the first message must arrive before the body deadline like any other."""
        try:
            async with asyncio.timeout_at(deadline):
                message = await anext(messages)
        except (StopAsyncIteration, TimeoutError):
            return
        if message.WhichOneof("request") not in ("request_headers", "request_body", "request_trailers"):
            return
        headers = message.request_headers.headers.headers
        request_id = next(
            (h.raw_value.decode("utf-8", "replace") or h.value for h in headers if h.key == REQUEST_ID), None
        )
        if self.director.metrics:
            self.director.metrics.rejected("", "", TOO_MANY_STREAMS)
        rejection = Rejection(
            503,
            TOO_MANY_STREAMS,
            f"the endpoint picker has {self.active_streams} requests open, its limit "
            "(limits.max_streams); retry later",
        )
        yield msg.immediate(rejection, request_id if request_id and valid_request_id(request_id) else None)


class _Deadline:
    """The request-side deadline of one stream (`limits.body_timeout_s` from its start)."""

    __slots__ = ("cancelled_read", "expired", "reading", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.expired = False
        self.reading = False  # the stream's task is waiting for Envoy's next message
        self.cancelled_read = False

    def expire(self) -> None:
        self.expired = True
        if self.reading:
            self.cancelled_read = True
            self.task.cancel()


BODY_TIMEOUT = "body_timeout"
TOO_MANY_STREAMS = "too_many_streams"
BUFFERS_FULL = "buffers_full"


def _body_timeout(limits: LimitsConfig) -> Rejection:
    return Rejection(
        408,
        BODY_TIMEOUT,
        f"the request body did not arrive within {limits.body_timeout_s:g} s (limits.body_timeout_s)",
    )
