"""The ext_proc stream state machine, driven by scripted message sequences as Envoy sends them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from support.extproc import (
    BUFFERED,
    DUPLEX,
    header_values,
    make_director,
    make_stream,
    request_body,
    request_headers,
    request_trailers,
    response_body,
    response_headers,
    response_trailers,
)

from epp.extproc import messages as msg
from epp.extproc.servicer import ExtProcServicer

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})


def decoded(reply):
    """The servicer sends echoed response chunks already serialized; read them back as messages."""
    return pb.ProcessingResponse.FromString(reply) if isinstance(reply, bytes) else reply


def kinds(replies) -> list[str]:
    return [decoded(r).WhichOneof("response") for r in replies]


def streamed_chunks(replies) -> list[tuple[bytes, bool]]:
    out = []
    for r in replies:
        if r.WhichOneof("response") == "request_body":
            s = r.request_body.response.body_mutation.streamed_response
            out.append((s.body, s.end_of_stream))
    return out


def test_full_duplex_defers_headers_until_body_ends_then_replies_in_order() -> None:
    stream = make_stream()
    assert list(stream.handle(request_headers())) == []
    assert list(stream.handle(request_body(CHAT[:10], False))) == []
    replies = list(stream.handle(request_body(CHAT[10:], True)))
    assert kinds(replies) == ["request_headers", "request_body"]
    common = replies[0].request_headers.response
    assert common.clear_route_cache
    headers = header_values(common.header_mutation)
    destination = headers["x-gateway-destination-endpoint"]
    assert destination in ("10.0.0.1:8000", "10.0.0.2:8000")
    # Header and envoy.lb metadata agree.
    lb = replies[0].dynamic_metadata.fields["envoy.lb"].struct_value
    assert lb.fields["x-gateway-destination-endpoint"].string_value == destination
    # The body is echoed unchanged, ending the stream.
    assert streamed_chunks(replies) == [(CHAT, True)]
    # Values travel as raw_value only (a set `value` would make Envoy reject the mutation).
    assert all(not h.header.value for h in common.header_mutation.set_headers)


def test_one_mib_body_is_echoed_in_chunks_of_at_most_62000_bytes() -> None:
    prompt = "x" * (1 << 20)
    body = orjson.dumps({"model": "m", "prompt": prompt})
    stream = make_stream()
    stream.handle(request_headers(path="/v1/completions"))
    replies = []
    for start in range(0, len(body), 16384):
        replies += stream.handle(request_body(body[start : start + 16384], start + 16384 >= len(body)))
    chunks = streamed_chunks(replies)
    assert kinds(replies)[0] == "request_headers"
    assert all(len(c) <= 62_000 for c, _ in chunks)
    assert b"".join(c for c, _ in chunks) == body
    assert [eos for _, eos in chunks] == [False] * (len(chunks) - 1) + [True]


def test_empty_body_in_full_duplex_still_gets_one_empty_chunk() -> None:
    stream = make_stream()
    stream.handle(request_headers())
    replies = list(stream.handle(request_body(b"", True)))
    # An empty body is not valid JSON: the client gets a 400, nothing half-sent.
    assert kinds(replies) == ["immediate_response"]
    assert replies[0].immediate_response.status.code == 400


def test_bodyless_request_is_answered_at_once() -> None:
    stream = make_stream()
    replies = list(stream.handle(request_headers({":method": "GET"}, path="/v1/models", end_of_stream=True)))
    assert kinds(replies) == ["request_headers"]
    assert "x-gateway-destination-endpoint" in header_values(
        replies[0].request_headers.response.header_mutation
    )


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
)
@pytest.mark.parametrize("empty", ["headers_end_of_stream", "zero_length_body", "trailers_only"])
def test_post_to_an_inference_path_without_a_body_is_400(path: str, empty: str) -> None:
    director = make_director()
    stream = make_stream(director)
    if empty == "headers_end_of_stream":
        replies = list(stream.handle(request_headers(path=path, end_of_stream=True)))
    else:
        assert list(stream.handle(request_headers(path=path))) == []
        last = request_body(b"", True) if empty == "zero_length_body" else request_trailers()
        replies = list(stream.handle(last))
    assert kinds(replies) == ["immediate_response"]
    assert replies[0].immediate_response.status.code == 400
    error = json.loads(replies[0].immediate_response.body)["error"]
    assert error["code"] == "bad_request" and "body is empty" in error["message"]
    assert stream.done and all(e.inflight_requests == 0 for e in director.pool)


def test_other_bodyless_requests_are_routed_on_load_with_or_without_an_empty_body() -> None:
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/load_lora_adapter"), ("GET", "/health")]:
        stream = make_stream()
        stream.handle(request_headers({":method": method}, path=path))
        replies = list(stream.handle(request_body(b"", True)))
        assert kinds(replies) == ["request_headers", "request_body"], (method, path)
        assert streamed_chunks(replies) == [(b"", True)]


def test_buffered_mode_answers_headers_at_once_and_decides_on_the_body() -> None:
    stream = make_stream()
    replies = list(stream.handle(request_headers(mode=BUFFERED)))
    assert kinds(replies) == ["request_headers"]
    assert not replies[0].request_headers.HasField("response")  # plain continue
    replies = list(stream.handle(request_body(CHAT, True)))
    assert kinds(replies) == ["request_body"]
    common = replies[0].request_body.response
    assert common.clear_route_cache
    assert "x-gateway-destination-endpoint" in header_values(common.header_mutation)
    assert not common.HasField("body_mutation")  # unchanged body is not re-sent


def test_trailers_end_the_body_in_full_duplex() -> None:
    stream = make_stream()
    stream.handle(request_headers())
    assert list(stream.handle(request_body(CHAT, False))) == []
    replies = list(stream.handle(request_trailers()))
    assert kinds(replies) == ["request_headers", "request_body", "request_trailers"]
    assert streamed_chunks(replies) == [(CHAT, False)]  # trailers, not the body, end the stream


def test_response_side_passes_through_and_releases_inflight_once() -> None:
    director = make_director()
    stream = make_stream(director)
    stream.handle(request_headers())
    stream.handle(request_body(CHAT, True))
    chosen = director.pool.get(stream.decision.destination)
    assert chosen.inflight_requests == 1
    assert kinds(stream.handle(response_headers(200))) == ["response_headers"]
    replies = list(stream.handle(response_body(b"data: 1\n\n", False)))
    assert replies[0].response_body.response.body_mutation.streamed_response.body == b"data: 1\n\n"
    replies = list(stream.handle(response_body(b"data: [DONE]\n\n", True)))
    assert replies[0].response_body.response.body_mutation.streamed_response.end_of_stream
    assert chosen.inflight_requests == 0
    assert kinds(stream.handle(response_trailers())) == ["response_trailers"]
    stream.close()  # the servicer always closes at stream end: must not release twice
    assert chosen.inflight_requests == 0 and chosen.inflight_tokens == 0


def test_streamed_response_mode_acknowledges_without_echo() -> None:
    stream = make_stream(make_director(response={"follow": "full"}))  # followed chunk by chunk
    stream.handle(request_headers(mode=BUFFERED, response_mode=1))  # STREAMED
    stream.handle(request_body(CHAT, True))
    stream.handle(response_headers())
    replies = list(stream.handle(response_body(b"chunk", False)))
    assert kinds(replies) == ["response_body"]
    assert not replies[0].response_body.HasField("response")


@pytest.mark.parametrize(
    ("body", "path", "status", "code"),
    [
        (b"{not json", "/v1/chat/completions", 400, "bad_request"),
        (b"[1, 2]", "/v1/chat/completions", 400, "bad_request"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "/v1/chat/completions", 400, "model_required"),
        (b'{"model": "m", "messages": "nope"}', "/v1/chat/completions", 400, "bad_request"),
        (b'{"model": "m", "prompt": 5}', "/v1/completions", 400, "bad_request"),
        (b'{"model": "m", "prompt": "x", "stream": "yes"}', "/v1/completions", 400, "bad_request"),
    ],
)
def test_bad_bodies_get_an_openai_error(body: bytes, path: str, status: int, code: str) -> None:
    stream = make_stream()
    stream.handle(request_headers(path=path))
    (reply,) = stream.handle(request_body(body, True))
    immediate = reply.immediate_response
    assert immediate.status.code == status
    error = json.loads(immediate.body)["error"]
    assert error["code"] == code and error["message"]
    assert header_values(immediate.headers)["content-type"] == "application/json"


def test_unknown_model_is_404_when_no_catch_all() -> None:
    director = make_director(models=[{"name": "llama", "targets": [{"model": "llama-v2"}]}])
    stream = make_stream(director)
    stream.handle(request_headers())
    (reply,) = stream.handle(request_body(CHAT, True))
    assert reply.immediate_response.status.code == 404
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "model_not_found"


def test_body_over_the_limit_is_413_and_stops_buffering() -> None:
    director = make_director(limits={"max_body_bytes": 2048})
    stream = make_stream(director)
    stream.handle(request_headers())
    assert list(stream.handle(request_body(b"x" * 2000, False))) == []
    (reply,) = stream.handle(request_body(b"x" * 2000, False))
    assert reply.immediate_response.status.code == 413
    assert "2048" in json.loads(reply.immediate_response.body)["error"]["message"]
    assert list(stream.handle(request_body(b"x", True))) == []  # late chunks are ignored


def test_no_endpoints_is_503_distinct_from_shedding() -> None:
    stream = make_stream(make_director(addresses=[]))
    stream.handle(request_headers())
    (reply,) = stream.handle(request_body(CHAT, True))
    assert reply.immediate_response.status.code == 503
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "no_endpoints"


@pytest.mark.parametrize("subset", [["10.0.0.2:8000"], "10.0.0.2:8000", "10.0.0.9:1, 10.0.0.2:8000"])
def test_subset_hint_list_or_comma_string_narrows_the_choice(subset) -> None:
    for _ in range(10):
        stream = make_stream()
        stream.handle(request_headers(subset=subset))
        replies = list(stream.handle(request_body(CHAT, True)))
        headers = header_values(replies[0].request_headers.response.header_mutation)
        assert headers["x-gateway-destination-endpoint"] == "10.0.0.2:8000"


def test_empty_subset_hint_is_503() -> None:
    stream = make_stream()
    stream.handle(request_headers(subset=[]))
    (reply,) = stream.handle(request_body(CHAT, True))
    assert reply.immediate_response.status.code == 503
    assert json.loads(reply.immediate_response.body)["error"]["code"] == "subset_empty"


def test_model_rewrite_rewrites_body_and_content_length() -> None:
    director = make_director(models=[{"name": "m", "targets": [{"model": "m-v2"}]}])
    stream = make_stream(director)
    stream.handle(request_headers({"content-length": str(len(CHAT))}))
    replies = list(stream.handle(request_body(CHAT, True)))
    body = b"".join(c for c, _ in streamed_chunks(replies))
    assert json.loads(body)["model"] == "m-v2"
    headers = header_values(replies[0].request_headers.response.header_mutation)
    assert headers["content-length"] == str(len(body))


def test_rewrite_header_presets_the_target_model_where_trusted() -> None:
    stream = make_stream(make_director(security={"trusted_control_headers": ["model_rewrite"]}))
    stream.handle(request_headers({"x-gateway-model-name-rewrite": "adapter-7"}))
    replies = list(stream.handle(request_body(CHAT, True)))
    assert json.loads(b"".join(c for c, _ in streamed_chunks(replies)))["model"] == "adapter-7"
    assert not replies[0].request_headers.response.header_mutation.remove_headers


def test_untrusted_control_headers_are_ignored_and_removed_upstream() -> None:
    """Default policy: a client's model rewrite is ignored (it would bypass the model rules) and removed,
    as are subset / served headers (the gateway passes those as metadata); objective and fairness id count."""
    director = make_director(objectives=[{"name": "critical", "priority": 5}])
    stream = make_stream(director)
    sent = {
        "x-llm-d-model-name-rewrite": "secret-adapter",
        "x-gateway-model-name-rewrite": "secret-adapter",
        "x-gateway-destination-endpoint-subset": "6.6.6.6:666",
        "x-gateway-destination-endpoint-served": "6.6.6.6:666",
        "x-llm-d-inference-objective": "critical",
        "x-llm-d-inference-fairness-id": "tenant-a",
    }
    stream.handle(request_headers(sent))
    replies = list(stream.handle(request_body(CHAT, True)))
    assert json.loads(b"".join(c for c, _ in streamed_chunks(replies)))["model"] == "m"  # body untouched
    assert sorted(replies[0].request_headers.response.header_mutation.remove_headers) == sorted(
        name for name in sent if "rewrite" in name or "endpoint" in name
    )
    request = stream.decision.request
    assert (request.target_model, request.priority, request.fairness_id) == ("m", 5, "tenant-a")


def test_request_id_is_generated_when_absent_and_kept_when_present() -> None:
    stream = make_stream()
    stream.handle(request_headers())
    replies = list(stream.handle(request_body(CHAT, True)))
    generated = header_values(replies[0].request_headers.response.header_mutation)["x-request-id"]
    assert len(generated) == 32
    stream = make_stream()
    stream.handle(request_headers({"x-request-id": "abc"}))
    replies = list(stream.handle(request_body(CHAT, True)))
    assert "x-request-id" not in header_values(replies[0].request_headers.response.header_mutation)


def test_client_sent_destination_header_never_decides() -> None:
    for _ in range(10):
        stream = make_stream(make_director(addresses=["10.0.0.1:8000"]))
        stream.handle(request_headers({"x-gateway-destination-endpoint": "6.6.6.6:666"}))
        replies = list(stream.handle(request_body(CHAT, True)))
        headers = header_values(replies[0].request_headers.response.header_mutation)
        assert headers["x-gateway-destination-endpoint"] == "10.0.0.1:8000"


def test_fallback_list_is_ordered_and_distinct() -> None:
    addresses = [f"10.0.0.{i}:8000" for i in range(1, 5)]
    stream = make_stream(make_director(addresses=addresses, limits={"fallback_endpoints": 2}))
    stream.handle(request_headers())
    replies = list(stream.handle(request_body(CHAT, True)))
    value = header_values(replies[0].request_headers.response.header_mutation)[
        "x-gateway-destination-endpoint"
    ]
    parts = value.split(",")
    assert len(parts) == 3 and len(set(parts)) == 3 and set(parts) <= set(addresses)


def test_served_endpoint_metadata_moves_the_inflight_count() -> None:
    director = make_director(limits={"fallback_endpoints": 1})
    stream = make_stream(director)
    stream.handle(request_headers())
    stream.handle(request_body(CHAT, True))
    picked, fallback = stream.decision.endpoints
    stream.handle(response_headers(200, served=fallback.address))
    assert (picked.inflight_requests, fallback.inflight_requests) == (0, 1)
    stream.close()
    assert fallback.inflight_requests == 0


def test_internal_error_is_500_for_that_request_only(monkeypatch) -> None:
    director = make_director()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(director.scheduler, "schedule", broken)
    stream = make_stream(director)
    stream.handle(request_headers())
    (reply,) = stream.handle(request_body(CHAT, True))
    assert reply.immediate_response.status.code == 500
    monkeypatch.undo()
    stream = make_stream(director)
    stream.handle(request_headers())
    assert kinds(stream.handle(request_body(CHAT, True)))[0] == "request_headers"


async def _messages(items, disconnect: bool = False) -> AsyncIterator:
    """Envoy's side of the stream; `disconnect` ends it with an error after the last item, as grpc
    does when the downstream client goes away."""
    for item in items:
        yield item
    if disconnect:
        raise ConnectionResetError("client went away")


async def test_client_disconnect_mid_body_releases_nothing_and_mid_response_releases_once() -> None:
    director = make_director(addresses=["10.0.0.1:8000"])
    servicer = ExtProcServicer(director, director.config.limits)
    endpoint = director.pool.get("10.0.0.1:8000")
    # Gone mid-body: nothing was decided, nothing is held.
    with pytest.raises(ConnectionResetError):
        async for _ in servicer.Process(
            _messages([request_headers(), request_body(CHAT[:5], False)], True), None
        ):
            pass
    assert endpoint.inflight_requests == 0 and servicer.active_streams == 0
    # Gone mid-response: the pick is released exactly once.
    script = [request_headers(), request_body(CHAT, True), response_headers(), response_body(b"x", False)]
    replies = []
    with pytest.raises(ConnectionResetError):
        async for reply in servicer.Process(_messages(script, True), None):
            replies.append(reply)
            if len(replies) == 2:
                assert endpoint.inflight_requests == 1
    assert endpoint.inflight_requests == 0 and endpoint.inflight_tokens == 0
    assert servicer.active_streams == 0


async def test_one_bad_request_does_not_disturb_concurrent_ones() -> None:
    director = make_director()
    servicer = ExtProcServicer(director, director.config.limits)
    good = [request_headers(), request_body(CHAT, True), response_headers(), response_body(b"ok", True)]
    bad = [request_headers(), request_body(b"{oops", True)]
    good_replies = [r async for r in servicer.Process(_messages(good), None)]
    bad_replies = [r async for r in servicer.Process(_messages(bad), None)]
    again = [r async for r in servicer.Process(_messages(good), None)]
    assert kinds(bad_replies) == ["immediate_response"]
    assert (
        kinds(good_replies)
        == kinds(again)
        == ["request_headers", "request_body", "response_headers", "response_body"]
    )
    assert all(e.inflight_requests == 0 for e in director.pool)


def test_duplex_constant_is_full_duplex() -> None:
    assert DUPLEX == 4


async def test_prefix_index_learns_the_pick_after_the_reply_is_sent() -> None:
    director = make_director(addresses=["10.0.0.1:8000"])
    servicer = ExtProcServicer(director, director.config.limits)
    prompt = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "p" * 2000}]})
    index = director.scheduler.scorers[0][0].index
    entries_at_reply = []
    async for _reply in servicer.Process(_messages([request_headers(), request_body(prompt, True)]), None):
        entries_at_reply.append(index.entries("10.0.0.1:8000"))
    assert entries_at_reply[0] == 0  # the decision left before learning
    assert index.entries("10.0.0.1:8000") > 0  # and the index learned right after


# -- response side: how far the picker follows a response -----------------------------------------------

STREAMED, NONE_MODE = 1, 0  # ProcessingMode.BodySendMode values


def decided_stream(director=None, response_mode: int = STREAMED):
    director = director or make_director(addresses=["10.0.0.1:8000"])
    stream = make_stream(director)
    stream.handle(request_headers(response_mode=response_mode))
    stream.handle(request_body(CHAT, True))
    stream.dispatched()
    return director, stream


def test_streamed_response_first_byte_mode_stops_after_the_first_chunk() -> None:
    director, stream = decided_stream()
    endpoint = director.pool.get("10.0.0.1:8000")
    decision = stream.decision
    assert kinds(stream.handle(response_headers(200))) == ["response_headers"]
    assert endpoint.inflight_requests == 1 and not stream.done
    # The first chunk was seen (time to first token), the picker stops following: released, done; the chunk
    # is not answered (Envoy passes it and the rest through once the stream ends).
    assert stream.handle(response_body(b"data: 1\n\n", False)) == []
    assert decision.first_byte and stream.done
    assert endpoint.inflight_requests == 0 and stream.decision is None


def test_full_follow_mode_keeps_acknowledging_to_the_end() -> None:
    director, stream = decided_stream(make_director(addresses=["10.0.0.1:8000"], response={"follow": "full"}))
    endpoint = director.pool.get("10.0.0.1:8000")
    stream.handle(response_headers(200))
    for i in range(5):
        assert kinds(stream.handle(response_body(b"data: %d\n\n" % i, False))) == ["response_body"]
        assert not stream.done and endpoint.inflight_requests == 1
    stream.handle(response_body(b"data: [DONE]\n\n", True))
    assert endpoint.inflight_requests == 0 and not stream.done  # ended by Envoy, not by the picker


def test_every_nth_request_is_followed_to_the_end_in_first_byte_mode() -> None:
    director = make_director(addresses=["10.0.0.1:8000"], response={"full_sample_every": 3})
    done = []
    for _ in range(6):
        _, stream = decided_stream(director)
        stream.handle(response_headers(200))
        stream.handle(response_body(b"data: 1\n\n", False))
        done.append(stream.done)
        stream.close()
    assert done == [True, True, False, True, True, False]


def test_full_duplex_response_is_always_echoed_to_the_end() -> None:
    director, stream = decided_stream(response_mode=DUPLEX)
    stream.handle(response_headers(200))
    for i in range(3):
        (reply,) = stream.handle(response_body(b"data: %d\n\n" % i, False))
        assert (
            decoded(reply).response_body.response.body_mutation.streamed_response.body == b"data: %d\n\n" % i
        )
        assert not stream.done  # never stops early: Envoy would lose the chunks it handed over
    assert director.pool.get("10.0.0.1:8000").inflight_requests == 1


def test_buffered_response_is_asked_to_stream_unless_disabled() -> None:
    _, stream = decided_stream(response_mode=BUFFERED)
    (reply,) = stream.handle(response_headers(200))
    assert decoded(reply).mode_override.response_body_mode == STREAMED
    director = make_director(addresses=["10.0.0.1:8000"], response={"streamed_override": False})
    _, stream = decided_stream(director, response_mode=BUFFERED)
    (reply,) = stream.handle(response_headers(200))
    assert not decoded(reply).HasField("mode_override")


def test_response_headers_only_mode_releases_at_the_stream_end() -> None:
    director, stream = decided_stream(response_mode=NONE_MODE)
    endpoint = director.pool.get("10.0.0.1:8000")
    stream.handle(response_headers(200))
    assert endpoint.inflight_requests == 1  # no body comes: the end of the stream is the signal
    stream.handle(response_trailers())
    assert endpoint.inflight_requests == 0


async def test_servicer_ends_the_grpc_stream_after_the_first_chunk_without_reading_on() -> None:
    director = make_director(addresses=["10.0.0.1:8000"])
    servicer = ExtProcServicer(director, director.config.limits, director.config.response)
    consumed = []

    async def envoy():
        script = [
            request_headers(response_mode=STREAMED),
            request_body(CHAT, True),
            response_headers(200),
            response_body(b"data: 0\n\n", False),
            response_body(b"data: 1\n\n", False),
            response_body(b"data: [DONE]\n\n", True),
        ]
        for message in script:
            consumed.append(message.WhichOneof("request"))
            yield message

    replies = [r async for r in servicer.Process(envoy(), None)]
    assert kinds(replies) == ["request_headers", "request_body", "response_headers"]
    assert consumed.count("response_body") == 1  # the rest was never asked for
    assert (servicer.streams, servicer.stopped_early, servicer.active_streams) == (1, 1, 0)
    assert director.pool.get("10.0.0.1:8000").inflight_requests == 0


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 62_000, 70_000])
@pytest.mark.parametrize("end_of_stream", [False, True])
def test_pre_serialized_echo_is_the_protobuf_encoding(size: int, end_of_stream: bool) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert (
        msg.echo_response_body(chunk, end_of_stream)
        == msg.streamed_response_body(chunk, end_of_stream).SerializeToString()
    )
