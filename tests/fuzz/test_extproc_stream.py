"""The ext_proc state machine under hostile message sequences, driven through `ExtProcServicer.Process`
without sockets on a virtual clock (no real time passes, however long the picker waits).

Envoy's side is a script of ProcessingRequest messages: a well-formed request and response, then damaged
(messages duplicated, dropped, swapped, inserted), or wholly random; with oversized bodies, bodies that are
not JSON, headers with control characters or invalid UTF-8, thousands of headers, every body mode, empty
bodies on inference paths, and a client that stops sending halfway (slow drip). Up to three streams share
one servicer at once, under small limits, so the shared limits (concurrent streams, buffered bytes) trip.

For every script: each reply is well formed (known kinds; header values Envoy accepts; destinations from the
pool; chunks within Envoy's size; at most one decision; nothing after an ImmediateResponse); a rejection is a
4xx/5xx with an OpenAI error body and its reason, never `internal_error` (a bug); no stream waits forever
(a stalled client gets a 408, a held request its flow-control outcome); no buffer outgrows its limit; and
afterwards every in-flight count, the servicer's open streams, its buffered bytes and the flow-control queue
are back to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from fuzz.strategies import INFERENCE_PATHS, PATHS, RAW_BODIES, examples, valid_request
from google.protobuf.struct_pb2 import Struct
from hypothesis import event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.extproc import response_headers
from support.virtual_time import run_virtual

from epp.config import load_config
from epp.datalayer.discovery.static import static_endpoints
from epp.datalayer.endpoints import EndpointPool, MetricsSnapshot
from epp.extproc.servicer import ExtProcServicer
from epp.observability.metrics import RequestMetrics
from epp.requestcontrol.director import Director
from epp.requestcontrol.headers import CONTROL_HEADERS, NEVER_FROM_CLIENTS
from epp.scheduling.registry import PluginContext, build_scheduler

POOL = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
NOW = 5000.0  # the metrics clock (fixed: staleness never changes during a script)
MAX_BODY = 4096
CHUNK = 1024
MODES = [ProcessingMode.NONE, ProcessingMode.STREAMED, ProcessingMode.BUFFERED,
         ProcessingMode.BUFFERED_PARTIAL, ProcessingMode.FULL_DUPLEX_STREAMED]  # fmt: skip
REPLY_HEADERS = {"x-gateway-destination-endpoint", "x-request-id", "content-length", "content-type",
                 "x-epp-reject-reason", "x-llm-d-request-dropped-reason"}  # fmt: skip
CODES = {"bad_request", "model_required", "model_not_found", "body_too_large", "no_endpoints", "subset_empty",
         "saturated_shed", "queue_full", "queue_timeout", "shutting_down", "buffers_full", "body_timeout",
         "too_many_streams"}  # fmt: skip
DETAIL = 30  # characters of a rejection's message in the statistics (--hypothesis-show-statistics)
STALL_WAIT_S = 10_000.0  # virtual seconds: far past every timeout the picker has in these configs


# -- messages ----------------------------------------------------------------------------------------------

HEADER_VALUE = (
    st.text(max_size=16).map(str.encode)
    | st.binary(max_size=16)
    | st.sampled_from([b"a\r\nx-gateway-destination-endpoint: 6.6.6.6:1", b"\x00", b"\xff\xfe", b" " * 300])
)
HEADER_NAME = st.sampled_from(
    ["x-request-id", "content-length", "content-type", "x-gateway-destination-endpoint", ":authority",
     *NEVER_FROM_CLIENTS, *(n for names in CONTROL_HEADERS.values() for n in names)]
) | st.text(min_size=1, max_size=12)  # fmt: skip
# The gateway's subset hint: mostly absent; else a list or a string, of pool members or junk.
SUBSET = st.integers(0, 5).flatmap(
    lambda n: (
        st.none()
        if n
        else st.lists(st.sampled_from([*POOL, "6.6.6.6:1", "", "x"]), max_size=3) | st.text(max_size=20)
    )
)
OBJECTIVE = st.sampled_from(["x-llm-d-inference-objective", "x-gateway-inference-objective"])


@st.composite
def request_headers(draw: st.DrawFn, first: bool = True) -> pb.ProcessingRequest:
    path = draw(PATHS)
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", ""]))
    headers = [(":method", method.encode()), (":path", path.encode())]
    headers += draw(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6))
    if draw(st.booleans()):  # a priority: sheddable, critical, unknown
        headers.append((draw(OBJECTIVE), draw(st.sampled_from([b"batch", b"critical", b"nope"]))))
    if draw(st.integers(0, 9)) == 0:  # thousands of headers
        headers += [(f"x-junk-{i}", b"v" * 8) for i in range(3000)]
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in headers]),
            end_of_stream=draw(st.integers(0, 5)) == 0,
        )
    )
    if first or draw(st.booleans()):
        message.protocol_config.CopyFrom(
            pb.ProtocolConfiguration(
                request_body_mode=draw(st.sampled_from([*MODES, *[ProcessingMode.FULL_DUPLEX_STREAMED] * 3])),
                response_body_mode=draw(st.sampled_from(MODES)),
            )
        )
    subset = draw(SUBSET)
    if subset is not None:
        hint = Struct()
        hint["x-gateway-destination-endpoint-subset"] = subset
        message.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": hint}))
    return message


def body_message(chunk: bytes, end_of_stream: bool, response: bool = False) -> pb.ProcessingRequest:
    body = pb.HttpBody(body=chunk, end_of_stream=end_of_stream)
    return pb.ProcessingRequest(response_body=body) if response else pb.ProcessingRequest(request_body=body)


RESPONSE_HEADERS = st.builds(
    response_headers,
    st.sampled_from([b"200", b"500", b"429", b"abc", b"", b"99999999999999999999"]),
    st.booleans(),
    st.none() | st.sampled_from([*POOL, "6.6.6.6:1", "", f"{POOL[1]},{POOL[0]}"]),
)
CHUNKS = st.binary(max_size=64) | st.sampled_from([b"", b"x" * (MAX_BODY + 1), b"y" * (MAX_BODY // 2)])
ANY_MESSAGE = st.one_of(
    request_headers(first=False),
    st.builds(body_message, CHUNKS, st.booleans()),
    st.just(pb.ProcessingRequest(request_trailers=pb.HttpTrailers())),
    RESPONSE_HEADERS,
    st.builds(body_message, CHUNKS, st.booleans(), st.just(True)),
    st.just(pb.ProcessingRequest(response_trailers=pb.HttpTrailers())),
    st.just(pb.ProcessingRequest()),  # no message kind at all
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@st.composite
def well_formed(draw: st.DrawFn) -> list[pb.ProcessingRequest]:
    """A request and its response as Envoy sends them: headers, the body in chunks (maybe ending with
    trailers), response headers, response chunks, maybe response trailers."""
    if draw(st.integers(0, 2)):
        path, body = draw(valid_request())
        raw = orjson.dumps(body)
    else:
        path, raw = draw(RAW_BODIES)
        if draw(st.integers(0, 4)) == 0:
            path, raw = draw(st.sampled_from(INFERENCE_PATHS)), b""  # empty body on an inference path
    headers = draw(request_headers())
    for header in headers.request_headers.headers.headers:
        if header.key == ":path":
            header.raw_value = path.encode()
    script = [headers]
    if not headers.request_headers.end_of_stream:
        duplex = headers.protocol_config.request_body_mode == ProcessingMode.FULL_DUPLEX_STREAMED
        # FULL_DUPLEX_STREAMED: the body in chunks as it arrives; otherwise Envoy buffers it: one message.
        pieces = _split(raw, draw(st.lists(st.integers(0, 1 << 20), max_size=4))) if duplex else [raw]
        trailers = draw(st.integers(0, 5)) == 0
        script += [body_message(p, not trailers and i == len(pieces) - 1) for i, p in enumerate(pieces)]
        if trailers:
            script.append(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()))
    script.append(draw(RESPONSE_HEADERS))
    chunks = draw(st.lists(st.binary(max_size=32), max_size=3))
    script += [body_message(c, i == len(chunks) - 1, response=True) for i, c in enumerate(chunks)]
    if draw(st.booleans()):
        script.append(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    return script


@st.composite
def damaged(draw: st.DrawFn) -> list[pb.ProcessingRequest]:
    """A well-formed script with messages duplicated, dropped, swapped or inserted; or a random one."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.lists(ANY_MESSAGE, max_size=8))
    script = draw(well_formed())
    for _ in range(draw(st.integers(0, 3))):
        operation = draw(st.sampled_from(["duplicate", "drop", "swap", "insert"]))
        at = draw(st.integers(0, max(0, len(script) - 1)))
        if operation == "duplicate" and script:
            script.insert(at, script[at])
        elif operation == "drop" and script:
            del script[at]
        elif operation == "swap" and len(script) > 1:
            other = draw(st.integers(0, len(script) - 1))
            script[at], script[other] = script[other], script[at]
        else:
            script.insert(at, draw(ANY_MESSAGE))
    return script


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    limits = {"max_body_bytes": MAX_BODY, "body_chunk_bytes": CHUNK, "body_timeout_s": 30.0,
              "max_buffered_bytes": draw(st.sampled_from([MAX_BODY, 4 * MAX_BODY])),
              "max_streams": draw(st.sampled_from([1, 2, 100, 100, 100])),
              "fallback_endpoints": draw(st.integers(0, 2))}  # fmt: skip
    config: dict[str, Any] = {
        "pool": {"endpoints": POOL},
        "scheduling": {"seed": 7},
        "limits": limits,
        "objectives": [{"name": "batch", "priority": -1}, {"name": "critical", "priority": 5}],
        "security": {
            "trusted_control_headers": draw(st.lists(st.sampled_from(list(CONTROL_HEADERS)), unique=True))
        },
        "response": {"follow": draw(st.sampled_from(["first-byte", "full"]))},
    }
    if draw(st.booleans()):
        config["models"] = [
            {"name": "m", "targets": [{"model": "m-v2", "weight": 1}, {"model": "m", "weight": 1}]}
        ]
        if draw(st.booleans()):
            config["models"].append({"name": "*"})
    if draw(st.booleans()):
        config["flow_control"] = {"enabled": True, "ttl_s": 5.0, "no_endpoints_ttl_s": 1.0,
                                  "buffered_wait_s": 2.0, "band_max_requests": None,
                                  "max_requests": draw(st.sampled_from([1, 100]))}  # fmt: skip
    return config


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    replies: list[pb.ProcessingResponse] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # loop time of each reply
    stalled: bool = False  # the client stopped sending before the script's end
    finished: bool = False  # Process ended on its own (else: still waiting for Envoy, which then resets)


def make_director(config: dict[str, Any], waiting: float) -> Director:
    cfg = load_config(None, config)
    pool = EndpointPool(static_endpoints(cfg.pool))
    for endpoint in pool:  # fresh metrics: the queue decides whether flow control holds
        endpoint.metrics = MetricsSnapshot(waiting=waiting, updated_at=NOW)
    scheduler = build_scheduler(PluginContext(cfg, pool, random.Random(7)))
    return Director(cfg, pool, scheduler, RequestMetrics(CollectorRegistry()), clock=lambda: NOW)


async def drive(servicer: ExtProcServicer, script: list[pb.ProcessingRequest], stall: bool) -> Outcome:
    outcome = Outcome(stalled=stall)
    limits = servicer.limits
    never = asyncio.Event()

    async def envoy() -> Any:
        for message in script:
            # Between messages (the picker has answered the previous one): buffers within their limits.
            assert 0 <= servicer.budget.used <= limits.max_buffered_bytes
            yield message
            await asyncio.sleep(0)  # let the other streams run
        if stall:
            await never.wait()  # a client that stops sending: only the picker's deadline ends this

    async def consume() -> None:
        loop = asyncio.get_running_loop()
        async for reply in servicer.Process(envoy(), None):
            outcome.replies.append(
                pb.ProcessingResponse.FromString(reply) if isinstance(reply, bytes) else reply
            )
            outcome.times.append(loop.time())
        outcome.finished = True

    task = asyncio.ensure_future(consume())
    await asyncio.wait([task], timeout=STALL_WAIT_S)
    if not task.done():  # still following the request: Envoy resets the stream (as it does at the end)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return outcome


def header_map(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def check_replies(outcome: Outcome, director: Director, untrusted: set[str]) -> None:
    limits = director.config.limits
    decisions = 0
    replies = outcome.replies
    for index, reply in enumerate(replies):
        kind = reply.WhichOneof("response")
        if kind is None:  # only flow control's interim reply has no kind
            assert reply.HasField("override_message_timeout"), reply
            continue
        if kind == "immediate_response":
            immediate = reply.immediate_response
            assert index == len(replies) - 1, "a reply after an ImmediateResponse"
            assert 400 <= immediate.status.code < 600 and immediate.status.code != 500, immediate
            error = orjson.loads(immediate.body)["error"]
            headers = header_map(immediate.headers)
            assert error["code"] in CODES and error["message"], error
            assert headers["x-epp-reject-reason"] == error["code"]
            mutations = [immediate.headers]
        elif kind.endswith("trailers"):
            mutations = [getattr(reply, kind).header_mutation]
        else:
            common = getattr(reply, kind).response
            mutations = [common.header_mutation]
            if kind == "request_body":  # the picker's own chunking (response chunks are Envoy's, echoed)
                assert len(common.body_mutation.streamed_response.body) <= limits.body_chunk_bytes
            assert set(common.header_mutation.remove_headers) <= untrusted
        for mutation in mutations:
            values = header_map(mutation)
            assert set(values) <= REPLY_HEADERS, values
            for key, value in values.items():
                assert not any(c in value for c in "\x00\r\n"), (key, value)  # Envoy would refuse it
            destination = values.get("x-gateway-destination-endpoint")
            if destination is not None:
                decisions += 1
                addresses = destination.split(",")
                assert set(addresses) <= set(POOL) and len(set(addresses)) == len(addresses)
    assert decisions <= 1, "two decisions on one stream"
    last = replies[-1] if replies else None
    if last is not None and last.WhichOneof("response") == "immediate_response":
        error = orjson.loads(last.immediate_response.body)["error"]
        event(f"ends with {last.immediate_response.status.code} {error['code']}: {error['message'][:DETAIL]}")
    else:
        ended = "finished" if outcome.finished else "reset by Envoy"
        event(f"{'decided' if decisions else 'no decision'}, {ended}")
    if outcome.stalled and not outcome.finished:
        assert decisions == 1, "a stalled stream still waiting must be past its decision (response side)"


def check_clean(director: Director, servicer: ExtProcServicer) -> None:
    assert servicer.active_streams == 0
    assert servicer.budget.used == 0
    for endpoint in director.pool:
        assert (endpoint.inflight_requests, endpoint.inflight_tokens) == (0, 0), endpoint.address
    if director.flow is not None:
        assert director.flow.size == 0


@settings(max_examples=examples(150))
@given(
    configs(),
    st.lists(st.tuples(damaged(), st.booleans()), min_size=1, max_size=3),
    st.sampled_from([0.0, 0.0, 50.0]),
)
def test_any_message_sequence_ends_cleanly(
    config: dict[str, Any], scripts: list[tuple[list[pb.ProcessingRequest], bool]], waiting: float
) -> None:
    async def main() -> None:
        director = make_director(config, waiting)
        servicer = ExtProcServicer(director, director.config.limits, director.config.response)
        untrusted = set(director.untrusted_headers)
        outcomes = await asyncio.gather(*(drive(servicer, script, stall) for script, stall in scripts))
        for outcome in outcomes:
            check_replies(outcome, director, untrusted)
        check_clean(director, servicer)
        await director.close()

    run_virtual(main())


@settings(max_examples=examples(100))
@given(configs(), well_formed(), st.integers(0, 20))
def test_a_client_that_stops_sending_mid_request_gets_a_408_and_frees_everything(
    config: dict[str, Any], script: list[pb.ProcessingRequest], keep: int
) -> None:
    """Slow drip: the client sends part of its request, then nothing. Exactly body_timeout_s after the
    stream's start the picker answers 408 body_timeout (unless it had already decided or refused), and
    holds nothing after."""
    config["limits"]["max_streams"] = 100
    request_side = [m for m in script if m.WhichOneof("request").startswith("request")]
    sent = request_side[: min(keep, max(0, len(request_side) - 1))]  # never the message that ends the body

    async def main() -> None:
        director = make_director(config, 0.0)
        servicer = ExtProcServicer(director, director.config.limits, director.config.response)
        started = asyncio.get_running_loop().time()
        outcome = await drive(servicer, sent, stall=True)
        check_replies(outcome, director, set(director.untrusted_headers))
        check_clean(director, servicer)
        last = outcome.replies[-1] if outcome.replies else None
        decided = any(
            "x-gateway-destination-endpoint" in header_map(getattr(r, kind).response.header_mutation)
            for r in outcome.replies
            if (kind := r.WhichOneof("response")) in ("request_headers", "request_body")
        )
        if not decided:  # still collecting when the client stalled: the deadline ends it, with a reply
            assert (
                outcome.finished and last is not None and last.WhichOneof("response") == "immediate_response"
            )
            error = orjson.loads(last.immediate_response.body)["error"]
            if error["code"] == "body_timeout":
                assert last.immediate_response.status.code == 408
                assert outcome.times[-1] - started == director.config.limits.body_timeout_s
        await director.close()

    run_virtual(main())
