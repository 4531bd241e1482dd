"""Build scripted ext_proc messages (as Envoy sends them) and a request director without a server."""

from __future__ import annotations

import random
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from epp.config import load_config
from epp.datalayer.discovery.static import static_endpoints
from epp.datalayer.endpoints import EndpointPool
from epp.extproc.servicer import RequestStream
from epp.requestcontrol.director import Director
from epp.scheduling.registry import PluginContext, build_scheduler

DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = ProcessingMode.BUFFERED


def request_headers(
    headers: dict[str, str] | None = None,
    *,
    mode: int = DUPLEX,
    response_mode: int = DUPLEX,
    end_of_stream: bool = False,
    subset: Any = None,
    path: str = "/v1/chat/completions",
) -> pb.ProcessingRequest:
    all_headers = {":method": "POST", ":path": path, "content-type": "application/json", **(headers or {})}
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in all_headers.items()]
            ),
            end_of_stream=end_of_stream,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=mode, response_body_mode=response_mode),
    )
    if subset is not None:
        hint = Struct()
        hint["x-gateway-destination-endpoint-subset"] = subset
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": hint}))
    return message


def request_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=chunk, end_of_stream=end_of_stream))


def request_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def response_headers(
    status: int | bytes = 200, end_of_stream: bool = False, served: str | None = None
) -> pb.ProcessingRequest:
    """`status` as an int, or as raw bytes (any bytes: the fuzz tests send malformed ones)."""
    raw = status if isinstance(status, bytes) else str(status).encode()
    message = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=":status", raw_value=raw)]),
            end_of_stream=end_of_stream,
        )
    )
    if served is not None:
        lb = Struct()
        lb["x-gateway-destination-endpoint-served"] = served
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb": lb}))
    return message


def response_body(chunk: bytes, end_of_stream: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=end_of_stream))


def response_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def make_director(addresses: list[str] | None = None, **overrides: Any) -> Director:
    """A director over a static pool (no scraping: metrics stay at their defaults)."""
    addresses = addresses if addresses is not None else ["10.0.0.1:8000", "10.0.0.2:8000"]
    data = {"pool": {"endpoints": addresses}, "scheduling": {"seed": 7}, **overrides}
    config = load_config(None, data)
    pool = EndpointPool(static_endpoints(config.pool))
    scheduler = build_scheduler(PluginContext(config, pool, random.Random(7)))
    return Director(config, pool, scheduler)


class DecodedStream(RequestStream):
    """A RequestStream whose replies are all messages: the servicer sends some already serialized (the
    echoed response chunks); tests read them back as messages."""

    def handle(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:  # type: ignore[override]
        return [
            pb.ProcessingResponse.FromString(r) if isinstance(r, bytes) else r
            for r in super().handle(message)
        ]


def make_stream(director: Director | None = None) -> RequestStream:
    director = director or make_director()
    return DecodedStream(director, director.config.limits, director.config.response)


def header_values(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
