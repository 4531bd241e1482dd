"""The simulated fleet over real HTTP: OpenAI shapes, SSE framing, metrics, errors and engine effects."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.sim import cli
from epp.sim.server import DEFAULT_MODEL, FleetConfig, SimFleet

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


async def stream(http: Http, url: str, body: dict[str, Any]) -> tuple[float, list[Any], str]:
    """POST a streaming request; returns (seconds to response headers, parsed JSON events, replica header)."""
    t0 = time.perf_counter()
    async with http.post(url, json={**body, "stream": True}) as resp:
        ttfb = time.perf_counter() - t0
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        payloads = sse_events(await resp.read())
        assert payloads[-1] == b"[DONE]"
        return ttfb, [orjson.loads(p) for p in payloads[:-1]], resp.headers["x-sim-replica"]


async def metrics(http: Http, address: str) -> dict[str, list[Any]]:
    async with http.get(f"http://{address}/metrics") as resp:
        text = await resp.text()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    """Poll an externally visible condition (metrics) until it holds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_cached_prefix_lowers_ttft(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet()
    url = f"http://{fleet.addresses[0]}/v1/completions"
    system = "You are a helpful assistant. " * 1100  # ~8,000 tokens
    body = {"model": DEFAULT_MODEL, "max_tokens": 3, "stream_options": {"include_usage": True}}
    cold, events1, _ = await stream(http, url, {**body, "prompt": system + "Question one?"})
    cold_sim = fleet.stats()["replicas"][0]["ttft_mean_s"]  # simulated seconds: deterministic
    _, events2, _ = await stream(http, url, {**body, "prompt": system + "Question two?"})
    warm_sim = 2 * fleet.stats()["replicas"][0]["ttft_mean_s"] - cold_sim
    assert events1[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = events2[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 7500 and cached % 16 == 0
    # Headers leave with the first token: the cold request's time to headers covers its prefill.
    p = fleet.replicas[0].engine.profile
    assert cold >= 0.9 * 0.05 * (
        p.prefill_overhead_s + p.prefill_per_token_s * events1[-1]["usage"]["prompt_tokens"]
    )
    assert warm_sim < cold_sim / 3
    stats = fleet.stats()["total"]
    assert stats["cached_tokens"] == cached and 0.4 < stats["prefix_hit_rate"] < 0.5


async def test_sse_framing_completions_and_chat(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(stream_interval=3)
    base = f"http://{fleet.addresses[0]}"
    _, events, replica = await stream(
        http, base + "/v1/completions", {"prompt": "Say something.", "max_tokens": 10}
    )
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
    _, events, _ = await stream(
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


async def test_completions_prompt_list_and_models(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(lora_adapters=("sql", "chat"))
    base = f"http://{fleet.addresses[0]}"
    async with http.post(
        base + "/v1/completions", json={"prompt": ["a b c", "d e f g"], "max_tokens": 2}
    ) as resp:
        doc = await resp.json()
    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert doc["usage"]["completion_tokens"] == 4 and doc["usage"]["prompt_tokens"] == 2 + 2
    _, events, _ = await stream(http, base + "/v1/completions", {"prompt": ["x", "y"], "max_tokens": 3})
    assert sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"]) == [0, 1]

    async with http.get(base + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL, "sql", "chat"]
    assert models["data"][1]["parent"] == DEFAULT_MODEL
    async with http.get(base + "/health") as resp:
        assert resp.status == 200


async def test_kv_full_requests_wait_visible_in_metrics(make_fleet: MakeFleet, http: Http) -> None:
    fleet = await make_fleet(num_gpu_blocks=100)
    address = fleet.addresses[0]
    prompts = [f"document {i} " + "z" * 3840 for i in range(3)]  # ~60 blocks each: one fits at a time
    tasks = [
        asyncio.create_task(
            http.post(f"http://{address}/v1/completions", json={"prompt": p, "max_tokens": 100})
        )
        for p in prompts
    ]

    async def two_waiting() -> bool:
        m = await metrics(http, address)
        return m["vllm:num_requests_waiting"][0].value == 2 and m["vllm:num_requests_running"][0].value == 1

    await until(two_waiting)
    m = await metrics(http, address)
    assert m["vllm:kv_cache_usage_perc"][0].value > 0.6
    assert m["vllm:gpu_cache_usage_perc"][0].value == m["vllm:kv_cache_usage_perc"][0].value
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200
        resp.release()
    assert fleet.stats()["total"]["completed"] == 3


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
    long_a = asyncio.create_task(http.post(url, json={"model": "a", "prompt": "hello", "max_tokens": 150}))

    async def a_running() -> bool:
        info = (await metrics(http, address))["vllm:lora_requests_info"][0]
        return info.labels["running_lora_adapters"] == "a"

    await until(a_running)
    b = asyncio.create_task(http.post(url, json={"model": "b", "prompt": "hello", "max_tokens": 2}))

    async def b_waiting() -> bool:
        info = (await metrics(http, address))["vllm:lora_requests_info"][0]
        return info.labels["waiting_lora_adapters"] == "b"

    await until(b_waiting)
    info = (await metrics(http, address))["vllm:lora_requests_info"][0]
    assert info.labels["max_lora"] == "1" and info.value > 1e9  # a timestamp
    assert not b.done()
    for resp in await asyncio.gather(long_a, b):
        assert resp.status == 200
        resp.release()
    assert fleet.stats()["total"]["lora_loads"] == 2


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
            _, events, _ = await stream(http, base + "/v1/completions", body)
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
    deadline = time.monotonic() + 3
    while engine.has_work():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
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
        sys.executable, "-m", "epp.sim.cli", "--replicas", "2", "--base-port", "0", "--time-scale", "0.01",
        "--lora-adapters", "a,b", "--ready-file", str(ready),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)  # type: ignore[union-attr]
        assert b"2 replica(s)" in line
        addresses = orjson.loads(ready.read_bytes())["addresses"]
        assert len(addresses) == 2
        for address in addresses:
            async with http.get(f"http://{address}/health") as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        rc = await asyncio.wait_for(proc.wait(), 10)
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


def test_cli_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--replicas", "0"]) == 2
    assert "replicas must be >= 1" in capsys.readouterr().err


async def test_stop_with_requests_in_flight_is_prompt(
    make_fleet: MakeFleet, http: Http, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("epp.sim.server.SHUTDOWN_GRACE_S", 0.05)
    fleet = await make_fleet(time_scale=1.0)
    url = f"http://{fleet.addresses[0]}/v1/completions"
    resp = await http.post(url, json={"prompt": "long", "max_tokens": 100_000, "stream": True})
    await resp.content.readline()
    t0 = time.monotonic()
    await fleet.stop()
    assert time.monotonic() - t0 < 1.0
    resp.close()
