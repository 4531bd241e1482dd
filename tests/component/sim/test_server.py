"""The simulated fleet over real HTTP: OpenAI shapes, SSE framing, metrics, errors and engine effects.

Real sockets, no clock: nothing here measures time. A state the test must observe is made to last until
the test ends it (a long request that the test then cancels), and is awaited by polling with a bound that
only guards against a hang (`until`); latency effects are the engine's, asserted on its virtual clock in
tests/unit/sim/test_engine.py.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp_lab.sim import cli
from epp_lab.sim.config import DEFAULT_MODEL, FleetConfig
from epp_lab.sim.fleet import SimFleet

MakeFleet = Callable[..., Awaitable[SimFleet]]
Http = aiohttp.ClientSession


@pytest.fixture
async def make_fleet() -> AsyncIterator[MakeFleet]:
    started: list[SimFleet] = []

    async def make(**kwargs: Any) -> SimFleet:
        kwargs.setdefault("time_scale", 0.05)
        fleet = SimFleet(FleetConfig(**kwargs))
        await fleet.start()
        started.append(fleet)
        return fleet

    yield make
    for fleet in started:
        await fleet.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into event payloads, checking the framing on the way."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    for e in events:
        assert e.startswith(b"data: "), e
    return [e[len(b"data: ") :] for e in events]


async def stream(
    http: Http, url: str, body: dict[str, Any], on_headers: Callable[[], None] | None = None
) -> tuple[list[Any], str]:
    """POST a streaming request; returns (parsed JSON events, replica header). `on_headers` runs as soon as
    the response headers arrived, before the body is read."""
    async with http.post(url, json={**body, "stream": True}) as resp:
        if on_headers is not None:
            on_headers()
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        payloads = sse_events(await resp.read())
        assert payloads[-1] == b"[DONE]"
        return [orjson.loads(p) for p in payloads[:-1]], resp.headers["x-sim-replica"]


async def metrics(http: Http, address: str) -> dict[str, list[Any]]:
    async with http.get(f"http://{address}/metrics") as resp:
        text = await resp.text()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


HANG_GUARD_S = 60.0
"""Bound of every wait below: reached only if the awaited state never comes (a hang), never a timing check."""


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition that, once it holds, holds until the test changes something (no transient states).

    The bound only turns a hang into a failure that names the awaited state."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"hang guard: {what} was never observed within {HANG_GUARD_S:g} s")
        await asyncio.sleep(0.005)  # the poll's period, not a stand-in for an event


async def test_cached_prefix_is_reused_and_headers_leave_with_the_first_token(
    make_fleet: MakeFleet, http: Http
) -> None:
    fleet = await make_fleet()
    engine = fleet.replicas[0].engine
    url = f"http://{fleet.addresses[0]}/v1/completions"
    system = "You are a helpful assistant. " * 1100  # ~8,000 tokens
    body = {"model": DEFAULT_MODEL, "max_tokens": 3, "stream_options": {"include_usage": True}}
    first_tokens_at_headers: list[int] = []

    def headers_arrived() -> None:  # how many requests had produced their first token by then
        first_tokens_at_headers.append(engine.stats.ttft_count)

    events1, _ = await stream(http, url, {**body, "prompt": system + "Question one?"}, headers_arrived)
    events2, _ = await stream(http, url, {**body, "prompt": system + "Question two?"}, headers_arrived)
    assert events1[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = events2[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 7500 and cached % 16 == 0
    # Headers leave with the first token, i.e. after the whole (cold) prefill: each request's headers
    # arrived only once the engine had produced its first token. (TTFT itself, cold vs cached: the engine
    # test on the virtual clock.)
    assert first_tokens_at_headers == [1, 2]
    assert [len(e[0]["choices"][0]["text"].split()) for e in (events1, events2)] == [1, 1]
    stats = fleet.stats()["total"]
    assert stats["cached_tokens"] == cached and 0.4 < stats["prefix_hit_rate"] < 0.5


async def test_sse_framing_completions_and_chat(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(stream_interval=3)
    base = f"http://{fleet.addresses[0]}"
    body = {"prompt": "Say something.", "max_tokens": 10}
    events, replica = await stream(http, base + "/v1/completions", body)
    assert replica == fleet.addresses[0].rsplit(":", 1)[1]
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)
    assert (
        len(events[0]["choices"][0]["text"].split()) == 1
    )  # the first event carries exactly the first token
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert sum(len(e["choices"][0]["text"].split()) for e in events) == 10
    assert len(events) == 4  # 1 + 3 + 3 + 3 with stream_interval=3

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    body = {"model": DEFAULT_MODEL, "messages": messages, "max_completion_tokens": 4}
    events, _ = await stream(
        http, base + "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["choices"][0]["delta"]["content"]
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])

    async with http.post(base + "/v1/chat/completions", json=body) as resp:
        doc = await resp.json()
    assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"] == text
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0


async def test_overdue_steps_still_yield_so_each_token_is_its_own_event(
    make_fleet: MakeFleet, http: Http
) -> None:
    # At this time scale every step is due long before the driver gets back to it: the driver always runs
    # late and catches up. It must still let the woken handler write before it applies the next step, so
    # with one token per event (stream interval 1) no two tokens ever share an event.
    fleet = await make_fleet(time_scale=1e-6)
    url = f"http://{fleet.addresses[0]}/v1/completions"
    events, _ = await stream(http, url, {"prompt": "Count to sixty-four.", "max_tokens": 64})
    assert [len(e["choices"][0]["text"].split()) for e in events] == [1] * 64
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 63 + ["length"]


async def test_completions_prompt_list_and_models(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(lora_adapters=("sql", "chat"))
    base = f"http://{fleet.addresses[0]}"
    async with http.post(
        base + "/v1/completions", json={"prompt": ["a b c", "d e f g"], "max_tokens": 2}
    ) as resp:
        doc = await resp.json()
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert doc["usage"]["completion_tokens"] == 4 and doc["usage"]["prompt_tokens"] == 2 + 2
    events, _ = await stream(http, base + "/v1/completions", {"prompt": ["x", "y"], "max_tokens": 3})
    assert sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"]) == [0, 1]

    async with http.get(base + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL, "sql", "chat"]
    assert models["data"][1]["parent"] == DEFAULT_MODEL
    async with http.get(base + "/health") as resp:
        assert resp.status == 200


async def test_kv_full_requests_wait_visible_in_metrics(make_fleet: MakeFleet, http: Http) -> None:
    # Real time (scale 1): the first request decodes ~600 tokens for ~6 s unless cancelled, holding ~60 of the
    # 100 KV blocks, so the other two (~60 blocks each) wait until the test cancels it.
    fleet = await make_fleet(num_gpu_blocks=100, time_scale=1.0)
    address = fleet.addresses[0]
    url = f"http://{address}/v1/completions"
    prompts = [f"document {i} " + "z" * 3840 for i in range(3)]  # ~60 blocks each: one fits at a time
    first = await http.post(url, json={"prompt": prompts[0], "max_tokens": 600, "stream": True})
    await first.content.readline()  # its first token: it is running
    rest = [asyncio.create_task(http.post(url, json={"prompt": p, "max_tokens": 2})) for p in prompts[1:]]
    seen: dict[str, list[Any]] = {}

    async def two_waiting() -> bool:
        seen.update(await metrics(http, address))
        return seen["vllm:num_requests_waiting"][0].value == 2

    await until(two_waiting, "2 requests waiting behind the first")
    # The same snapshot: one running, the KV cache mostly pinned by it, both usage names agree.
    assert seen["vllm:num_requests_running"][0].value == 1
    assert seen["vllm:kv_cache_usage_perc"][0].value > 0.6
    assert seen["vllm:gpu_cache_usage_perc"][0].value == seen["vllm:kv_cache_usage_perc"][0].value
    first.close()  # the client goes away: its request is aborted and frees its blocks
    for resp in await asyncio.gather(*rest):
        assert resp.status == 200
        resp.release()
    total = fleet.stats()["total"]
    assert (total["completed"], total["aborted"]) == (2, 1)


async def test_eviction_under_pressure(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(num_gpu_blocks=128, time_scale=0.01)
    url = f"http://{fleet.addresses[0]}/v1/completions"

    async def cached(prompt: str) -> int:
        async with http.post(url, json={"prompt": prompt, "max_tokens": 1}) as resp:
            doc = await resp.json()
        return int(doc["usage"]["prompt_tokens_details"]["cached_tokens"])

    prefixes = [f"<tenant {i}>" + "q" * 2000 for i in range(8)]  # ~31 blocks each; 8 of them overflow 128
    assert await cached(prefixes[0] + " first") == 0
    assert await cached(prefixes[0] + " again") > 400  # still cached
    for p in prefixes[1:]:
        await cached(p)
    assert await cached(prefixes[0] + " much later") == 0  # evicted (least recently used)
    assert await cached(prefixes[-1] + " recent") > 400
    assert fleet.stats()["total"]["evicted_blocks"] > 0


async def test_lora_slots_and_load_delay(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(lora_adapters=("a", "b"), max_lora=1)
    address = fleet.addresses[0]
    url = f"http://{address}/v1/completions"
    # Adapter a holds the only slot while its (very long) request runs, until the test cancels it.
    body = {"model": "a", "prompt": "hello", "max_tokens": 100_000, "stream": True}
    long_a = await http.post(url, json=body)
    await long_a.content.readline()  # its first token: a is loaded and running

    async def a_running() -> bool:
        info = (await metrics(http, address))["vllm:lora_requests_info"][0]
        return info.labels["running_lora_adapters"] == "a"

    await until(a_running, "adapter a running")
    b = asyncio.create_task(http.post(url, json={"model": "b", "prompt": "hello", "max_tokens": 2}))

    async def b_waiting() -> bool:
        info = (await metrics(http, address))["vllm:lora_requests_info"][0]
        return info.labels["waiting_lora_adapters"] == "b"

    await until(b_waiting, "adapter b waiting for the slot")
    info = (await metrics(http, address))["vllm:lora_requests_info"][0]
    assert info.labels["max_lora"] == "1" and info.value > 1e9  # a timestamp
    assert info.labels["running_lora_adapters"] == "a" and info.labels["waiting_lora_adapters"] == "b"
    assert not b.done()
    long_a.close()  # a's request ends (aborted): its slot can be given to b, which then loads and runs
    resp = await b
    assert resp.status == 200
    resp.release()
    total = fleet.stats()["total"]
    assert total["lora_loads"] == 2 and (total["completed"], total["aborted"]) == (1, 1)


async def test_metrics_parse_with_prometheus_parser(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(num_gpu_blocks=4096, lora_adapters=("x",))
    address = fleet.addresses[0]
    for _ in range(2):
        async with http.post(f"http://{address}/v1/completions", json={"prompt": "p" * 700, "max_tokens": 2}):
            pass
    m = await metrics(http, address)
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_to_first_token_seconds_count",
        "vllm:time_to_first_token_seconds_sum",
    ):
        assert name in m, name
    assert m["vllm:cache_config_info"][0].labels == {"block_size": "16", "num_gpu_blocks": "4096"}
    assert m["vllm:num_requests_running"][0].labels == {"model_name": DEFAULT_MODEL}
    assert m["vllm:request_success_total"][0].value == 2
    assert m["vllm:prefix_cache_queries_total"][0].value == 2 * 175
    assert m["vllm:prefix_cache_hits_total"][0].value == 160  # 10 full blocks of the repeated prompt
    assert m["vllm:time_to_first_token_seconds_count"][0].value == 2
    buckets = m["vllm:time_to_first_token_seconds_bucket"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/completions", b"{not json", 400, "BadRequestError"),
        ("/v1/completions", b"[1, 2]", 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": 5}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e9}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 99999999}', 400, "BadRequestError"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "BadRequestError"),
        ("/v1/chat/completions", b'{"messages": "hi"}', 400, "BadRequestError"),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', 400, "BadRequestError"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 3}]}', 400, "BadRequestError"),
        ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "NotFoundError"),
        ("/v1/chat/completions", b'{"model": "nope", "messages": []}', 404, "NotFoundError"),
    ],
)
async def test_errors_like_vllm(
    make_fleet: MakeFleet, http: Http, path: str, body: bytes, status: int, kind: str
) -> None:
    fleet = await make_fleet()
    base = f"http://{fleet.addresses[0]}"
    async with http.post(base + path, data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        doc = await resp.json()
    assert doc["object"] == "error" and doc["type"] == kind and doc["code"] == status and doc["message"]
    async with http.post(base + "/v1/completions", json={"prompt": "still alive", "max_tokens": 1}) as resp:
        assert resp.status == 200


async def test_deterministic_outputs(make_fleet: MakeFleet, http: Http) -> None:
    async def run(seed: int) -> list[Any]:
        fleet = await make_fleet(seed=seed, time_scale=0.01)
        base = f"http://{fleet.addresses[0]}"
        out: list[Any] = []
        for i in range(4):
            body = {"prompt": f"shared prefix {'x' * 300} user {i % 2}", "max_tokens": 5 + i}
            async with http.post(base + "/v1/completions", json=body) as resp:
                doc = await resp.json()
            out.append((doc["choices"][0]["text"], doc["usage"]))
            events, _ = await stream(http, base + "/v1/completions", body)
            out.append("".join(e["choices"][0]["text"] for e in events))
        return out

    first, second, other = await run(7), await run(7), await run(8)
    assert first == second
    assert first[0][0] != other[0][0]
    assert first[0][0] == first[1]  # streaming and not: same text


async def test_client_disconnect_aborts(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet()
    engine = fleet.replicas[0].engine
    resp = await http.post(
        f"http://{fleet.addresses[0]}/v1/completions",
        json={"prompt": "go", "max_tokens": 10_000, "stream": True},
    )
    await resp.content.readline()
    resp.close()

    async def idle() -> bool:
        return not engine.has_work()

    await until(idle, "the engine idle after the client went away")
    assert engine.stats.aborted == 1 and engine.kv_usage() == 0.0


async def test_fleet_ports_and_stats_endpoint(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(replicas=3)
    assert len(set(fleet.addresses)) == 3
    for address in fleet.addresses:
        async with http.post(
            f"http://{address}/v1/completions", json={"prompt": "hi", "max_tokens": 1}
        ) as resp:
            assert resp.headers["x-sim-replica"] == address.rsplit(":", 1)[1]
    async with http.get(f"http://{fleet.addresses[1]}/sim/stats") as resp:
        doc = await resp.json()
    assert doc["replica"]["address"] == fleet.addresses[1]
    assert [r["completed"] for r in doc["replicas"]] == [1, 1, 1] and doc["total"]["completed"] == 3
    assert set(doc["total"]) >= {
        "prompt_tokens",
        "cached_tokens",
        "prefix_hit_rate",
        "lora_loads",
        "completed",
    }


async def test_cli_runs_until_sigterm_and_writes_ready_file(tmp_path: Any, http: Http) -> None:
    ready = tmp_path / "ready.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp_lab.sim.cli", "--replicas", "2", "--base-port", "0",
        "--time-scale", "0.01", "--lora-adapters", "a,b", "--ready-file", str(ready),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), HANG_GUARD_S)  # type: ignore[union-attr]
        assert b"2 replica(s)" in line
        addresses = orjson.loads(ready.read_bytes())["addresses"]
        assert len(addresses) == 2
        for address in addresses:
            async with http.get(f"http://{address}/health") as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), HANG_GUARD_S)
    assert rc == 0, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    assert not ready.exists()


def test_cli_port_in_use_is_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["--base-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "Traceback" not in err


async def test_stop_with_requests_in_flight_is_prompt(
    make_fleet: MakeFleet, http: Http, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("epp_lab.sim.fleet.SHUTDOWN_GRACE_S", 0.05)
    fleet = await make_fleet(time_scale=1.0)
    engine = fleet.replicas[0].engine
    url = f"http://{fleet.addresses[0]}/v1/completions"
    # ~1,000 s of decoding in real time: the stop below cannot be waiting for it to finish.
    resp = await http.post(url, json={"prompt": "long", "max_tokens": 100_000, "stream": True})
    await resp.content.readline()
    try:
        await asyncio.wait_for(fleet.stop(), HANG_GUARD_S)
    except TimeoutError:
        pytest.fail("hang guard: stopping the fleet waited for the in-flight request")
    # The in-flight request was cancelled after the grace period, not run to completion.

    async def aborted() -> bool:
        return engine.stats.aborted == 1

    await until(aborted, "the in-flight request aborted")
    assert engine.stats.completed == 0 and not engine.has_work()
    try:
        body = await resp.content.read()
    except aiohttp.ClientPayloadError:  # the connection closed mid-body
        body = b""
    assert b"[DONE]" not in body  # its stream was cut, never completed
    resp.close()
