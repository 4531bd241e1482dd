"""Real vLLM replicas behind real Envoy and the picker: responses and errors pass through intact, prefix
routing produces real cache hits (vs Envoy round-robin), the precise scorer predicts the engine's cache."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from support.realengine import Gateway, counters, post, precise_scorers

from epp_lab.realengine.agreement import AgreementRun, text, workload
from epp_lab.realengine.replicas import RealEngineEnv, RealFleet
from epp_lab.realengine.timing import stream_timing

pytestmark = [pytest.mark.realengine, pytest.mark.asyncio(loop_scope="session")]

HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def sse_events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split("\n\n") if e]


def content(path: str, stream: bool, raw: bytes) -> tuple[str, dict]:
    """(generated text, usage) of a response, checking the SSE framing of a stream."""
    chat = "chat" in path
    if not stream:
        doc = json.loads(raw)
        choice = doc["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), doc["usage"]
    events = sse_events(raw)
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events), raw[:500]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    pieces = []
    for c in chunks:
        for choice in c["choices"]:
            pieces.append((choice["delta"].get("content") or "") if chat else choice["text"])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []  # the usage chunk (stream_options.include_usage)
    return "".join(pieces), usage


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_pass_through_intact(fleet: RealFleet, path: str, stream: bool) -> None:
    """Greedy decoding on identical weights: what the client gets through Envoy and the picker equals what
    a replica answers directly, streamed or not."""
    prompt = "def fibonacci(n):\n    "
    body: dict = {"model": "base", "max_tokens": 12, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update({"messages": [{"role": "user", "content": prompt}]} if "chat" in path else {"prompt": prompt})
    async with Gateway(fleet.addresses) as gateway:
        status, headers, raw = await post(gateway.url + path, body)
    assert status == 200, raw[:500]
    assert headers["Content-Type"].startswith("text/event-stream" if stream else "application/json")
    direct_status, _, direct = await post(fleet.urls[0] + path, body)
    assert direct_status == 200
    got, usage = content(path, stream, raw)
    want, direct_usage = content(path, stream, direct)
    assert got == want and got
    assert usage["completion_tokens"] == direct_usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] == direct_usage["prompt_tokens"]


ERRORS = [
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2}),  # 404 NotFoundError
    (
        "/v1/completions",
        {"model": "base", "prompt": "hi", "max_tokens": 5000},
    ),  # 400 max_tokens > max_model_len
    ("/v1/completions", {"model": "base", "prompt": "x " * 5000, "max_tokens": 2}),  # 400 prompt too long
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": "two"}),
    ("/v1/completions", {"model": "base", "prompt": "hi", "temperature": "hot"}),  # 400 validation error
]


async def test_engine_error_bodies_reach_the_client_unchanged(fleet: RealFleet) -> None:
    async with Gateway(fleet.addresses) as gateway:
        for path, body in ERRORS:
            status, headers, raw = await post(gateway.url + path, body)
            direct_status, _, direct = await post(fleet.urls[0] + path, body)
            assert status == direct_status and status >= 400, (body, status, raw[:300])
            assert json.loads(raw) == json.loads(direct), (body, raw[:300], direct[:300])
            assert "x-epp-reject-reason" not in headers  # the engine's answer, not the picker's


async def shared_prefix_hit_rate(fleet: RealFleet, gateway_url: str, seed: int) -> float:
    """7 groups x 4 users: ~2,400-token group prefixes, short questions; each round sends one request per
    group at once. The fleet's prefix-cache hit rate over the run (tokens), from vLLM's own counters."""
    rng = random.Random(seed)
    prefixes = [text(rng, 1500) for _ in range(7)]
    before = await counters(fleet.urls, HITS, QUERIES)
    for user in range(4):
        bodies = [
            {"model": "base", "prompt": p + f"Question {user}: " + text(rng, 40), "max_tokens": 4}
            for p in prefixes
        ]
        results = await asyncio.gather(*(post(gateway_url + "/v1/completions", b) for b in bodies))
        assert [r[0] for r in results] == [200] * len(bodies), [r[2][:200] for r in results]
    after = await counters(fleet.urls, HITS, QUERIES)
    return (after[HITS] - before[HITS]) / (after[QUERIES] - before[QUERIES])


async def test_prefix_routing_produces_real_cache_hits(
    fleet: RealFleet, realengine_env: RealEngineEnv
) -> None:
    """Each arm gets its own prompts (cold for it); 128-block caches hold a replica's share of the groups
    but not all 7 groups, so round-robin, which shows every group to every replica, keeps evicting."""
    async with Gateway(fleet.addresses, shape="direct") as rr:
        round_robin = await shared_prefix_hit_rate(fleet, rr.url, seed=1)
    async with Gateway(fleet.addresses) as epp:
        picker = await shared_prefix_hit_rate(fleet, epp.url, seed=2)
    async with Gateway(fleet.addresses, scorers=precise_scorers(realengine_env.model_dir)) as precise:
        precise_rate = await shared_prefix_hit_rate(fleet, precise.url, seed=3)
    print(
        "\nfleet prefix-cache hit rate (vllm:prefix_cache_hits_total / queries_total): "
        f"round-robin {round_robin:.3f}, epp (defaults) {picker:.3f}, "
        f"epp with precise-prefix-cache {precise_rate:.3f}"
    )
    assert picker >= round_robin + 0.15, (round_robin, picker)
    assert precise_rate >= round_robin + 0.15, (round_robin, precise_rate)


async def test_precise_index_predicts_what_the_engine_caches(
    fleet: RealFleet, realengine_env: RealEngineEnv
) -> None:
    """Events arrive, hits are predicted for prompts the engine really has cached, and evictions are seen:
    the precise index's predicted cached tokens equal vLLM's `cached_tokens`, request by request."""
    async with AgreementRun(realengine_env, fleet.addresses) as run:
        report = await run.run(workload(seed=11))
        views = [run.precise.index.view(a) for a in fleet.addresses]
    summary = report.summary()
    total, evictions = summary["all"], summary["phases"]["evictions"]
    print(f"\nagreement with vLLM's cached_tokens over {total['requests']} requests "
          f"({total['requests_with_hits']} with hits): precise {total['precise_agreement']:.2f} "
          f"(MAE {total['precise_mae_tokens']:.0f} tokens), approximate {total['approximate_agreement']:.2f} "
          f"(MAE {total['approximate_mae_tokens']:.0f}); after evictions: precise "
          f"{evictions['precise_agreement']:.2f}, "
          f"approximate {evictions['approximate_agreement']:.2f}")  # fmt: skip
    assert summary["unsynced_predictions"] == 0  # complete views from the start: replayed on connect
    late = [o for o in report.outcomes if o.events_late]
    assert not late, (late, [(v.reason, v.orphans, v.stored_events) for v in views if v is not None])
    assert total["requests_with_hits"] >= 10
    assert total["precise_agreement"] >= 0.95 > total["approximate_agreement"]
    assert all(v is not None and v.synced and v.stored_events > 0 for v in views)
    assert views[0] is not None and views[0].removed_blocks > 0  # evictions seen
    hits = [o for o in report.outcomes if o.cached > 0]
    assert all(o.precise == o.cached for o in hits)  # every real hit was predicted, to the token


async def test_when_streamed_headers_arrive(fleet: RealFleet) -> None:
    """Recorded, not asserted (no timing assertions): whether vLLM sends a stream's headers before the
    first token. The picker takes time to first token from the first body chunk either way."""
    rng = random.Random(5)
    rows = []
    for tokens in (8, 2000):
        prompt = text(rng, tokens)
        for path, body in (
            ("/v1/completions", {"prompt": prompt}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
        ):
            t = await stream_timing(
                fleet.addresses[1], path, {"model": "base", "max_tokens": 4, "stream": True, **body}
            )
            assert "data: {" in t.first_body, t.first_body
            rows.append(f"{path} ~{tokens * 3 // 2} tokens: headers {t.headers_s * 1000:.1f} ms, first body "
                        f"{t.first_body_s * 1000:.1f} ms")  # fmt: skip
    print("\nstreamed response timing (request sent -> ...):\n  " + "\n  ".join(rows))
