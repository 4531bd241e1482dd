"""Flow control at the wire: a held request's `Wait`, the replies `resume` gives (in the order they would
have had at once), BUFFERED mode's message-timeout extension, disconnects, metrics and `explain`. Driven
message by message on a virtual clock, with an injected metrics clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry
from support.extproc import BUFFERED, header_values, request_body, request_headers, request_trailers
from support.virtual_time import run_virtual

from epp.config import load_config
from epp.datalayer.discovery.static import static_endpoints
from epp.datalayer.endpoints import EndpointPool, MetricsSnapshot
from epp.extproc.servicer import ExtProcServicer, RequestStream, Wait
from epp.observability.metrics import RequestMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.registry import PluginContext, build_scheduler

NOW = 5000.0
POOL = ["10.0.0.1:8000", "10.0.0.2:8000"]
CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})


def make(waiting: float = 50, **flow: Any) -> Director:
    """A director with flow control over a pool scraped at NOW with `waiting` queued on each endpoint;
    objective "batch" is sheddable."""
    config = load_config(
        None,
        {"pool": {"endpoints": POOL}, "scheduling": {"seed": 7},
         "objectives": [{"name": "batch", "priority": -1}], "flow_control": {"enabled": True, **flow}},
    )  # fmt: skip
    pool = EndpointPool(static_endpoints(config.pool))
    scheduler = build_scheduler(PluginContext(config, pool, random.Random(7)))
    director = Director(config, pool, scheduler, RequestMetrics(CollectorRegistry()), clock=lambda: NOW)
    set_waiting(director, waiting)
    return director


def set_waiting(director: Director, waiting: float) -> None:
    """A scrape (at NOW) shows `waiting` on every endpoint."""
    for e in director.pool:
        e.metrics = MetricsSnapshot(waiting=waiting, updated_at=NOW)


def stream_of(director: Director) -> RequestStream:
    return RequestStream(director, director.config.limits, director.config.response)


def kinds(replies: Any) -> list[str]:
    return [r.WhichOneof("response") for r in replies]


async def room(director: Director) -> None:
    """Capacity frees (a scrape shows empty queues) and the dispatch pass runs."""
    set_waiting(director, 0)
    assert director.flow is not None
    director.flow.kick()
    await asyncio.sleep(0)


def test_a_held_request_resumes_with_the_replies_it_would_have_had_at_once() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        assert list(stream.handle(request_headers())) == []
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait) and wait.interim == ()  # FULL_DUPLEX: no deadline to extend
        assert director.flow is not None and director.flow.size == 1
        assert all(e.inflight_requests == 0 for e in director.pool)  # not bound to an endpoint yet
        await room(director)
        await wait.ready
        replies = stream.resume()
        assert kinds(replies) == ["request_headers", "request_body"]
        destination = header_values(replies[0].request_headers.response.header_mutation)[
            "x-gateway-destination-endpoint"
        ]
        assert destination in POOL
        assert replies[1].request_body.response.body_mutation.streamed_response.body == CHAT
        assert sum(e.inflight_requests for e in director.pool) == 1  # bound at dispatch
        stream.dispatched()
        stream.close()
        assert sum(e.inflight_requests for e in director.pool) == 0

    run_virtual(main())


def test_a_request_held_at_trailers_gets_its_trailers_reply_last() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        stream.handle(request_headers())
        assert list(stream.handle(request_body(CHAT, False))) == []
        wait = stream.handle(request_trailers())
        assert isinstance(wait, Wait)
        await room(director)
        await wait.ready
        assert kinds(stream.resume()) == ["request_headers", "request_body", "request_trailers"]

    run_virtual(main())


async def times_out_after(stream, wait: Wait, seconds: float) -> None:
    """The held BUFFERED request is answered 503 naming buffered_wait_s, exactly `seconds` later."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await wait.ready
    assert loop.time() - start == pytest.approx(seconds)
    [reply] = stream.resume()
    assert reply.immediate_response.status.code == 503
    assert b"buffered_wait_s" in reply.immediate_response.body


def test_buffered_mode_bounds_the_wait_below_envoys_message_timeout() -> None:
    async def main() -> None:
        director = make(buffered_wait_s=2.0)
        stream = stream_of(director)
        stream.handle(request_headers(mode=BUFFERED))
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait) and wait.interim == ()
        await times_out_after(stream, wait, 2.0)

    run_virtual(main())


def test_buffered_mode_can_ask_envoy_to_extend_its_message_timeout() -> None:
    async def main() -> None:
        director = make(buffered_wait_s=2.0, extend_message_timeout=True)
        stream = stream_of(director)
        assert kinds(stream.handle(request_headers(mode=BUFFERED))) == ["request_headers"]
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        [interim] = wait.interim
        assert interim.WhichOneof("response") is None
        assert interim.override_message_timeout.ToMilliseconds() == 3000  # the wait + 1 s of margin
        await times_out_after(stream, wait, 2.0)

    run_virtual(main())


def test_buffered_mode_dispatch_carries_the_decision_on_the_body_reply() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        stream.handle(request_headers(mode=BUFFERED))
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        await room(director)
        await wait.ready
        [reply] = stream.resume()
        assert "x-gateway-destination-endpoint" in header_values(reply.request_body.response.header_mutation)

    run_virtual(main())


def test_drops_carry_the_reason_in_both_headers_and_the_body() -> None:
    async def main() -> None:
        director = make(ttl_s=1.0, no_endpoints_ttl_s=1.0)
        stream = stream_of(director)
        stream.handle(request_headers())
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        await wait.ready
        [reply] = stream.resume()
        immediate = reply.immediate_response
        assert immediate.status.code == 503
        headers = header_values(immediate.headers)
        assert headers["x-epp-reject-reason"] == headers["x-llm-d-request-dropped-reason"] == "queue_timeout"
        assert orjson.loads(immediate.body)["error"]["code"] == "queue_timeout"

    run_virtual(main())


def test_a_sheddable_request_is_shed_at_once_with_the_dropped_reason() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        stream.handle(request_headers({"x-llm-d-inference-objective": "batch"}))
        [reply] = stream.handle(request_body(CHAT, True))  # type: ignore[misc]
        headers = header_values(reply.immediate_response.headers)
        assert reply.immediate_response.status.code == 429
        assert headers["x-llm-d-request-dropped-reason"] == "saturated_shed"

    run_virtual(main())


def test_closing_a_held_stream_frees_the_queue_slot_at_once() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        stream.handle(request_headers())
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        stream.close()  # Envoy reset the stream (the client went away)
        assert director.flow is not None and director.flow.size == 0 and director.flow.bytes == 0
        await room(director)
        assert all(e.inflight_requests == 0 for e in director.pool)

    run_virtual(main())


def test_a_stream_closed_after_dispatch_but_before_its_reply_releases_the_endpoint() -> None:
    async def main() -> None:
        director = make()
        stream = stream_of(director)
        stream.handle(request_headers())
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        await room(director)
        assert sum(e.inflight_requests for e in director.pool) == 1
        stream.close()  # cancelled between the dispatch and the resume
        assert sum(e.inflight_requests for e in director.pool) == 0

    run_virtual(main())


async def _messages(*messages: pb.ProcessingRequest) -> AsyncIterator[pb.ProcessingRequest]:
    for m in messages:
        yield m


def test_the_servicer_awaits_a_held_request_without_blocking_other_streams() -> None:
    async def main() -> None:
        director = make()
        servicer = ExtProcServicer(director, director.config.limits, director.config.response)
        held: list[Any] = []

        async def run() -> None:
            async for reply in servicer.Process(_messages(request_headers(), request_body(CHAT, True)), None):
                held.append(reply)

        task = asyncio.ensure_future(run())
        await asyncio.sleep(0.5)  # virtual: the stream is parked on its ticket
        assert held == [] and servicer.active_streams == 1
        # Another stream is served meanwhile (here: a body that is not JSON, answered 400 at once).
        bad = _messages(request_headers(), request_body(b"{", True))
        other = [r async for r in servicer.Process(bad, None)]
        assert other[0].immediate_response.status.code == 400
        assert held == [] and servicer.active_streams == 1
        await room(director)
        await task
        assert kinds(held) == ["request_headers", "request_body"]
        assert servicer.active_streams == 0

    run_virtual(main())


def test_cancelling_a_waiting_stream_leaves_no_trace() -> None:
    async def main() -> None:
        director = make()
        servicer = ExtProcServicer(director, director.config.limits, director.config.response)

        async def run() -> None:
            async for _ in servicer.Process(_messages(request_headers(), request_body(CHAT, True)), None):
                pass

        task = asyncio.ensure_future(run())
        await asyncio.sleep(0.1)
        assert director.flow is not None and director.flow.size == 1
        task.cancel()  # what grpc does when Envoy resets the stream
        with pytest.raises(asyncio.CancelledError):
            await task
        assert director.flow.size == 0 and servicer.active_streams == 0
        await room(director)
        assert all(e.inflight_requests == 0 for e in director.pool)

    run_virtual(main())


def test_shutdown_answers_held_requests_with_503_shutting_down() -> None:
    async def main() -> None:
        director = make()
        streams = [stream_of(director) for _ in range(3)]
        waits = []
        for s in streams:
            s.handle(request_headers())
            waits.append(s.handle(request_body(CHAT, True)))
        await director.close()
        for s, w in zip(streams, waits, strict=True):
            assert isinstance(w, Wait)
            await w.ready
            [reply] = s.resume()
            assert reply.immediate_response.status.code == 503
            assert header_values(reply.immediate_response.headers)["x-epp-reject-reason"] == "shutting_down"

    run_virtual(main())


def test_metrics_show_the_queue_and_the_outcomes() -> None:
    async def main() -> None:
        director = make()
        assert director.metrics is not None
        registry = director.metrics.registry
        streams = []
        for tenant in ("a", "a", "b"):
            s = stream_of(director)
            s.handle(request_headers({"x-llm-d-inference-fairness-id": tenant}))
            streams.append((s, s.handle(request_body(CHAT, True))))
        labels = {"fairness_id": "a", "priority": "0", "inference_pool": "default-pool",
                  "model_name": "m", "target_model_name": "m"}  # fmt: skip
        assert registry.get_sample_value("inference_extension_flow_control_queue_size", labels) == 2
        assert registry.get_sample_value("inference_extension_flow_control_queue_bytes", labels) == 2 * len(
            CHAT
        )
        saturation = registry.get_sample_value(
            "inference_extension_flow_control_pool_saturation", {"inference_pool": "default-pool"}
        )
        assert saturation == pytest.approx(50 / director.config.flow_control.queue_threshold)
        await room(director)  # room for two (one waiting per endpoint closes the gate): a, then b
        duration = "inference_extension_flow_control_request_queue_duration_seconds_count"
        dispatched = {**labels, "outcome": "Dispatched"}
        assert registry.get_sample_value(duration, dispatched) == 1
        assert registry.get_sample_value(duration, {**dispatched, "fairness_id": "b"}) == 1
        assert registry.get_sample_value("inference_extension_flow_control_queue_size", labels) == 1

    run_virtual(main())


def test_explain_says_whether_a_request_would_wait_and_why() -> None:
    director = make()
    headers = {":path": "/v1/chat/completions"}
    out = director.explain(headers, CHAT)
    assert out.flow_control == "queue" and out.rejection is None
    assert "saturated" in out.flow_reason
    assert out.gate_saturation == pytest.approx(50 / director.config.flow_control.queue_threshold)
    assert out.destination in POOL  # where it would go if it were dispatched now
    set_waiting(director, 0)
    out = director.explain(headers, CHAT)
    assert out.flow_control == "dispatch" and "room" in out.flow_reason
    assert director.flow is not None and director.flow.size == 0  # a dry run queues nothing


def test_explain_of_a_sheddable_request_under_saturation_is_the_429() -> None:
    director = make()
    out = director.explain({":path": "/v1/chat/completions", "x-llm-d-inference-objective": "batch"}, CHAT)
    assert out.flow_control == "reject" and out.rejection is not None
    assert out.rejection.code == "saturated_shed"


def test_a_held_request_with_a_rewritten_model_gets_its_rewritten_body() -> None:
    async def main() -> None:
        director = make()
        director.router = type(director.router)(
            load_config(None, {"models": [{"name": "m", "targets": [{"model": "m-v2"}]}]})
        )
        stream = stream_of(director)
        stream.handle(request_headers())
        wait = stream.handle(request_body(CHAT, True))
        assert isinstance(wait, Wait)
        await room(director)
        await wait.ready
        headers_reply, body_reply = stream.resume()
        body = body_reply.request_body.response.body_mutation.streamed_response.body
        assert orjson.loads(body)["model"] == "m-v2"
        headers = header_values(headers_reply.request_headers.response.header_mutation)
        assert headers["content-length"] == str(len(body))

    run_virtual(main())
