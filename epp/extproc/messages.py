"""Builders for the ext_proc `ProcessingResponse` messages the picker sends (and the fixed ones).

Wire rules these follow (Envoy's ext_proc API and the GIE protocol): header values go in `raw_value` only;
the decision sets `clear_route_cache`; streamed body chunks are at most `chunk_size` bytes and the last one
carries `end_of_stream`; an empty body still gets one (empty) chunk.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from epp.errors import Rejection
from epp.requestcontrol.headers import DESTINATION as DESTINATION_HEADER
from epp.requestcontrol.headers import DROPPED_REASON as DROPPED_REASON_HEADER
from epp.requestcontrol.headers import REJECT_REASON as REJECT_REASON_HEADER
from epp.requestcontrol.headers import REQUEST_ID

DESTINATION_METADATA_NAMESPACE = "envoy.lb"
SERVED_METADATA_KEY = "x-gateway-destination-endpoint-served"
SUBSET_METADATA_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_METADATA_KEY = "x-gateway-destination-endpoint-subset"

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Fixed "continue unchanged" replies, built once and reused (they are never mutated).
REQUEST_HEADERS_CONTINUE = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
RESPONSE_HEADERS_CONTINUE = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
RESPONSE_BODY_CONTINUE = pb.ProcessingResponse(response_body=pb.BodyResponse())
REQUEST_TRAILERS_CONTINUE = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
RESPONSE_TRAILERS_CONTINUE = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
# Continue the response headers and ask Envoy for the response body chunk by chunk (STREAMED) instead of
# whole (BUFFERED); honoured only where the filter has allow_mode_override.
RESPONSE_HEADERS_CONTINUE_STREAMED = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(),
    mode_override=ProcessingMode(response_body_mode=ProcessingMode.STREAMED),
)


def header_mutation(headers: Iterable[tuple[str, str]]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
            for k, v in headers
        ]
    )


def destination_metadata(destination: str) -> Struct:
    metadata = Struct()
    metadata.get_or_create_struct(DESTINATION_METADATA_NAMESPACE)[DESTINATION_HEADER] = destination
    return metadata


def decision_headers_response(headers: list[tuple[str, str]], destination: str) -> pb.ProcessingResponse:
    """FULL_DUPLEX / bodyless: the request-headers reply that carries the decision."""
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=header_mutation(headers), clear_route_cache=True)
        ),
        dynamic_metadata=destination_metadata(destination),
    )


def decision_body_response(
    headers: list[tuple[str, str]], destination: str, new_body: bytes | None
) -> pb.ProcessingResponse:
    """BUFFERED: the request-body reply carries the decision (headers were answered already)."""
    common = pb.CommonResponse(header_mutation=header_mutation(headers), clear_route_cache=True)
    if new_body is not None:
        common.body_mutation.body = new_body
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common), dynamic_metadata=destination_metadata(destination)
    )


def streamed_request_body(body: bytes, chunk_size: int, end_of_stream: bool) -> list[pb.ProcessingResponse]:
    """The whole request body as streamed_response chunks (FULL_DUPLEX_STREAMED)."""
    if not body:
        return [_streamed_chunk("request_body", b"", end_of_stream)]
    view = memoryview(body)
    last = len(body)
    out = []
    for start in range(0, last, chunk_size):
        stop = min(start + chunk_size, last)
        out.append(_streamed_chunk("request_body", bytes(view[start:stop]), end_of_stream and stop == last))
    return out


def _streamed_chunk(side: str, chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    """One `streamed_response` body chunk on `side` ("request_body" or "response_body")."""
    body = pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
            )
        )
    )
    return pb.ProcessingResponse(**{side: body})


def streamed_response_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    """Echo one response-body chunk unchanged (FULL_DUPLEX_STREAMED response side), as a message object.
    The servicer sends `echo_response_body` instead: the same bytes on the wire, built without protobuf."""
    return _streamed_chunk("response_body", chunk, end_of_stream)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _echo_head(size: int, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse around a `size`-byte echoed chunk, up to the chunk's first byte:

        response_body (4) { response (1) { body_mutation (3) { streamed_response (3) {
            body (1): <chunk>, end_of_stream (2): true }}}}

    each length-delimited field as tag, varint length, payload; proto3 leaves out an empty body and a false
    end_of_stream."""
    inner = (1 + len(_varint(size)) + size if size else 0) + (2 if end_of_stream else 0)
    mutation = 1 + len(_varint(inner)) + inner
    common = 1 + len(_varint(mutation)) + mutation
    body_response = 1 + len(_varint(common)) + common
    head = b"\x22" + _varint(body_response) + b"\x0a" + _varint(common) + b"\x1a" + _varint(mutation)
    head += b"\x1a" + _varint(inner)
    return head + (b"\x0a" + _varint(size) if size else b"")


_ECHO_HEADS: dict[tuple[int, bool], bytes] = {}
_ECHO_CACHE_LIMIT = 1 << 16  # chunk sizes whose heads are kept (SSE events are tens to hundreds of bytes)


def echo_response_body(chunk: bytes, end_of_stream: bool) -> bytes:
    """`streamed_response_body(chunk, end_of_stream)` already serialized: a cached head + the chunk (one copy,
    no protobuf objects). This is the per-token cost of FULL_DUPLEX_STREAMED responses, so it is kept to a
    dict lookup and one concatenation; the servicer's serializer passes bytes through."""
    key = (len(chunk), end_of_stream)
    head = _ECHO_HEADS.get(key)
    if head is None:
        head = _echo_head(len(chunk), end_of_stream)
        if len(chunk) < _ECHO_CACHE_LIMIT:
            _ECHO_HEADS[key] = head
    return head + chunk + b"\x10\x01" if end_of_stream else head + chunk


def override_message_timeout(seconds: float) -> pb.ProcessingResponse:
    """Ask Envoy to wait `seconds` (from now) for the reply to the message it sent last; honoured only up to
    the filter's `max_message_timeout` (ignored where that is unset). For requests held in flow control
    while Envoy buffers the body (BUFFERED mode applies `message_timeout` to the picker's reply)."""
    timeout = Duration()
    timeout.FromMilliseconds(max(1, round(seconds * 1000)))
    return pb.ProcessingResponse(override_message_timeout=timeout)


def immediate(rejection: Rejection, request_id: str | None = None) -> pb.ProcessingResponse:
    """End the request with our own status and an OpenAI-style JSON error body. A dropped request (429 / 503:
    shed, queue limits, queue timeout, no endpoints, shutting down) also says why in the llm-d header."""
    headers = [("content-type", "application/json"), (REJECT_REASON_HEADER, rejection.code)]
    if rejection.status in (429, 503):
        headers.append((DROPPED_REASON_HEADER, rejection.code))
    if request_id:
        headers.append((REQUEST_ID, request_id))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=rejection.status),  # type: ignore[arg-type]
            headers=header_mutation(headers),
            body=rejection.body(),
            details=f"epp_{rejection.code}",
        )
    )
