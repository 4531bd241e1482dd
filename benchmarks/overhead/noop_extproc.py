"""A no-op ext_proc server: the cheapest correct picker, the floor for any grpc.aio picker.

It speaks the same wire protocol as `epp serve` in both request body modes, but decides nothing: every
request goes to one fixed `--destination`. What is left is the cost of grpc.aio + uvloop + protobuf for the
messages Envoy exchanges per HTTP request, which every Python picker pays.

Request side, by the mode Envoy announces in `protocol_config`:
  FULL_DUPLEX_STREAMED  no reply to the headers; collect body chunks; at end of body reply headers
                        (destination header + metadata, clear_route_cache), then the body echoed as
                        ≤ 62,000-byte `streamed_response` chunks, the last with end_of_stream
  BUFFERED              continue the headers at once, then answer the one body message with the
                        destination header
  headers end_of_stream bodyless: answer the headers with the destination at once
Response side passes through: headers continue, body echoed (FULL_DUPLEX) or continued (STREAMED),
trailers continue. With `--response first-byte` it ends its stream after continuing the first response body
chunk in STREAMED mode (as `epp`'s default `response.follow: first-byte`): the floor of that path.

    python -m benchmarks.overhead.noop_extproc --destination 127.0.0.1:8100 [--port 0] [--ready-file F]
        [--response full|first-byte]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.struct_pb2 import Struct

DESTINATION_HEADER = "x-gateway-destination-endpoint"
CHUNK = 62_000
_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED


def _streamed(chunk: bytes, end_of_stream: bool, response_side: bool) -> pb.ProcessingResponse:
    body = pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
            )
        )
    )
    return (
        pb.ProcessingResponse(response_body=body)
        if response_side
        else pb.ProcessingResponse(request_body=body)
    )


class NoopServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str, first_byte: bool = False) -> None:
        self.first_byte = first_byte
        mutation = pb.HeaderMutation(
            set_headers=[
                HeaderValueOption(
                    header=HeaderValue(key=DESTINATION_HEADER, raw_value=destination.encode()),
                    append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ]
        )
        metadata = Struct()
        metadata.get_or_create_struct("envoy.lb")[DESTINATION_HEADER] = destination
        decision = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        # Built once and reused: none of these is ever mutated.
        self.headers_decision = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=decision), dynamic_metadata=metadata
        )
        self.body_decision = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=decision), dynamic_metadata=metadata
        )
        self.headers_continue = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        self.response_headers_continue = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        self.response_body_continue = pb.ProcessingResponse(response_body=pb.BodyResponse())
        self.request_trailers_continue = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        self.response_trailers_continue = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    def _echo_request_body(self, body: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        if not body:
            return [_streamed(b"", end_of_stream, False)]
        last = len(body)
        return [
            _streamed(body[i : i + CHUNK], end_of_stream and i + CHUNK >= last, False)
            for i in range(0, last, CHUNK)
        ]

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        duplex = response_duplex = decided = False
        chunks: list[bytes] = []
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                if message.HasField("protocol_config"):
                    duplex = message.protocol_config.request_body_mode == _FULL_DUPLEX
                    response_duplex = message.protocol_config.response_body_mode == _FULL_DUPLEX
                if message.request_headers.end_of_stream:
                    decided = True
                    yield self.headers_decision
                elif not duplex:
                    yield self.headers_continue
            elif kind == "request_body":
                if decided:
                    continue
                body = message.request_body
                if not duplex:
                    decided = True
                    yield self.body_decision
                    continue
                if body.body:
                    chunks.append(body.body)
                if body.end_of_stream:
                    decided = True
                    yield self.headers_decision
                    for reply in self._echo_request_body(b"".join(chunks), True):
                        yield reply
                    chunks = []
            elif kind == "request_trailers":
                if duplex and not decided:
                    decided = True
                    yield self.headers_decision
                    for reply in self._echo_request_body(b"".join(chunks), False):
                        yield reply
                    chunks = []
                yield self.request_trailers_continue
            elif kind == "response_headers":
                yield self.response_headers_continue
            elif kind == "response_body":
                if response_duplex:
                    body = message.response_body
                    yield _streamed(body.body, body.end_of_stream, True)
                else:
                    yield self.response_body_continue
                    if self.first_byte:
                        return
            elif kind == "response_trailers":
                yield self.response_trailers_continue


async def serve(host: str, port: int, destination: str, ready_file: str | None, first_byte: bool) -> None:
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]
    )
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopServicer(destination, first_byte), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if ready_file:
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(json.dumps({"extproc": bound}))
        tmp.replace(ready_file)  # readers never see a half-written file
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--destination", required=True, help="ip:port every request is sent to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="ext_proc port (0 = any free port)")
    parser.add_argument("--ready-file", help='write {"extproc": port} here once serving')
    parser.add_argument(
        "--response", choices=["full", "first-byte"], default="full",
        help="follow responses to the end, or stop after the first STREAMED body chunk",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.host, args.port, args.destination, args.ready_file, args.response == "first-byte"))


if __name__ == "__main__":
    main()
