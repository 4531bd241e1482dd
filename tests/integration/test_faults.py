"""Faults through the real Envoy binary: what a client sees and what the picker's state becomes when a model
server dies mid-stream, serves a broken /metrics page, or the whole pool is down; when the picker itself, or
Envoy, restarts under the other; when clients vanish mid-body, mid-stream or while queued; and when the
Kubernetes API server goes away and comes back.

Model servers are simulated replicas run as child processes (`procs.sim(1, base_port=P)`, so one can be
SIGKILLed and started again at its address) or the scripted in-process `Upstream`s; the picker runs
in-process (the `stack` fixture) where its state is read directly, or as a child process on a fixed
ext_proc port where it must crash and come back.

Nothing here asserts a duration. Every wait is for an event or a condition under a hang guard
(`support.faults.until`). Recovery times are measured and printed (`[faults] ...` lines, also recorded as
JUnit properties), for the README's reliability section.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from support.faults import (
    HANG_GUARD_S,
    FaultyUpstream,
    Stream,
    chat,
    open_request,
    post,
    read_until,
    send_request,
    until,
    vanish,
)
from support.gateway import subset_from_header

from epp_lab import procs
from epp_lab.envoy_launcher import free_port
from epp_lab.sim.config import DEFAULT_MODEL

pytestmark = pytest.mark.envoy

PIN = "x-test-pin"


def sim_chat(content: str, stream: bool = False, max_tokens: int = 8) -> dict[str, Any]:
    """A chat completion for the simulator's model."""
    return chat(content, stream, max_tokens, DEFAULT_MODEL)


@pytest.fixture
def report(
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, Any], None]
) -> Callable[[str, float, str], None]:
    """`report(what, seconds, setting)`: print a measured recovery time (and record it as a property)."""

    def emit(what: str, seconds: float, setting: str = "") -> None:
        record_property(what, round(seconds, 4))
        with capsys.disabled():
            print(f"\n[faults] {what}: {seconds:.3f} s" + (f" ({setting})" if setting else ""))

    return emit


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await sims(n, **options)` → n single-replica simulators, each a child process on a port of
    its own (fixed, so that a killed one can be started again at the same address); stopped after the test."""
    started: list[procs.Child] = []

    async def make(count: int, **options: Any) -> list[procs.Child]:
        batch = [procs.sim(1, base_port=free_port(), **options) for _ in range(count)]
        started.extend(batch)
        await asyncio.gather(*(child.start() for child in batch))
        return batch

    yield make
    await asyncio.gather(*(child.stop() for child in started))


def address(sim: procs.Child) -> str:
    [only] = sim.info["addresses"]
    return str(only)


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


async def idle(server: Any) -> float:
    """Await the picker's request state back at zero (streams, in-flight counts, flow-control queue)."""

    def quiet() -> bool:
        flow = server.director.flow
        return (
            server.servicer.active_streams == 0
            and all(e.inflight_requests == 0 and e.inflight_tokens == 0 for e in server.pool)
            and (flow is None or (flow.size == 0 and flow.bytes == 0))
        )

    return await until(quiet, "the picker's streams, in-flight counts and queue to return to zero")


# ---- 1. a replica killed mid-stream ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "extra"),
    [("gateway", {}), ("ai-gateway", {}), ("override-host", {"limits": {"fallback_endpoints": 1}})],
    ids=["gateway", "ai-gateway", "override-host+fallback"],
)
async def test_a_replica_killed_mid_stream(sims, stack, report, shape: str, extra: dict[str, Any]) -> None:
    """SIGKILL one of three replicas while streams run on every replica: the dead one's streams end short,
    the others finish intact; the picker marks it unreachable after its failed scrapes and routes around it;
    its in-flight count returns to zero; started again at its address, it is reachable again."""
    fleet = await sims(3, time_scale=1)
    victim, *others = fleet
    dead = address(victim)
    server, envoy = await stack([address(s) for s in fleet], shape=shape,
                                extra_http_filters=[subset_from_header(PIN)], **extra)  # fmt: skip
    endpoint = server.pool.get(dead)
    assert endpoint is not None
    async with aiohttp.ClientSession() as session:
        # Streams pinned to each replica: two on the victim (long enough never to finish), one on each other.
        doomed = [
            Stream(session, envoy.url, sim_chat(f"doomed {i}", True, 20_000), {PIN: dead}) for i in range(2)
        ]
        survivors = [Stream(session, envoy.url, sim_chat(f"survivor {i}", True, 600), {PIN: address(s)})
                     for i, s in enumerate(others)]  # fmt: skip
        for stream in doomed + survivors:
            async with asyncio.timeout(HANG_GUARD_S):
                await stream.started.wait()
        assert all(s.status == 200 and not s.task.done() for s in doomed + survivors), "streams running"

        killed = time.perf_counter()
        await victim.kill()
        # Requests keep coming (unpinned, one after the other) while the picker notices.
        probes: list[tuple[float, int, str | None]] = []
        noticed = asyncio.ensure_future(until(lambda: not endpoint.reachable, f"{dead} to be unreachable"))
        released = asyncio.ensure_future(until(lambda: endpoint.inflight_requests == 0, "in-flight release"))
        while not noticed.done():
            status, headers, _ = await post(session, envoy.url, sim_chat(f"probe {len(probes)}"))
            probes.append((time.perf_counter(), status, headers.get("x-sim-replica")))
        unreachable_at, released_at = await noticed, await released

        # From then on, nothing goes to the dead replica and nothing fails.
        after = [await post(session, envoy.url, sim_chat(f"after {i}")) for i in range(20)]
        assert [status for status, _, _ in after] == [200] * 20
        assert port_of(dead) not in {headers.get("x-sim-replica") for _, headers, _ in after}

        results = [await s.task for s in doomed + survivors]
    for stream, (status, text, _) in zip(doomed, results[:2], strict=True):
        assert status == 200 and not stream.complete, (
            f"a stream of the killed replica ended normally: {text!r}"
        )
    for stream, (_, text, error) in zip(survivors, results[2:], strict=True):
        assert stream.complete and error is None, (
            f"a stream of a live replica was cut: {error!r} {text[-200:]!r}"
        )
        assert stream.served_by != port_of(dead)

    failed = [(t, status) for t, status, _ in probes if status != 200]
    if shape == "override-host":  # Envoy retries a refused connection on the next address of the list
        assert failed == [], f"requests failed despite the fallback endpoint: {failed}"
    else:  # no retry: a request routed to the dead replica before the picker noticed fails at once (503)
        assert {status for _, status in failed} <= {503}
    last_failed = max((t for t, _ in failed), default=killed) - killed
    report(f"killed replica -> unreachable in the picker [{shape}]", unreachable_at - killed,
           "scrape every 0.02 s, 3 failures; connection refused")  # fmt: skip
    report(f"killed replica -> last request that failed on it [{shape}]", last_failed,
           f"{len(failed)} of {len(probes)} back-to-back requests failed meanwhile")  # fmt: skip
    report(f"killed replica -> its in-flight count at zero [{shape}]", released_at - killed)

    # Started again at the same address: reachable again after its next scrape, and routed to.
    await victim.start()
    ready = time.perf_counter()
    back = await until(lambda: endpoint.reachable, f"{dead} to be reachable again")
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, envoy.url, sim_chat("back"), {PIN: dead})
    assert status == 200 and headers.get("x-sim-replica") == port_of(dead)
    report(f"restarted replica ready -> reachable in the picker [{shape}]", back - ready,
           "the failing endpoint's scrape back-off is capped at 2 s")  # fmt: skip
    await idle(server)


# ---- 2. a replica whose /metrics page hangs, fails or is garbage ----------------------------------------


@pytest.mark.parametrize("fault", ["hang", "error", "garbage"])
async def test_a_broken_metrics_page(stack, report, fault: str) -> None:
    """One of three model servers keeps serving inference but its /metrics page hangs (the scrape times
    out), answers 500, or answers 200 with random bytes. Requests are served throughout. A hanging or
    failing page makes the endpoint unreachable after `unreachable_after` (3) failed scrapes, and the picker
    routes around it; a garbage page is a "bad page": the endpoint stays reachable (the server answered) on
    its last good metrics, which go stale (the saturation checks count it as saturated). When the page is
    right again, the endpoint is back."""
    ups = [FaultyUpstream() for _ in range(3)]
    for upstream in ups:
        await upstream.start()
    try:
        await _broken_metrics(stack, report, fault, ups)
    finally:
        for upstream in ups:
            await upstream.stop()


async def _broken_metrics(stack: Any, report: Any, fault: str, ups: list[FaultyUpstream]) -> None:
    bad = ups[0]
    server, envoy = await stack([u.address for u in ups])
    endpoint = server.pool.get(bad.address)
    assert endpoint is not None
    detector = server.director.detector
    stale_after = detector.staleness(len(server.pool))
    await until(lambda: all(e.metrics.updated_at > 0 for e in server.pool), "every endpoint to be scraped")

    def stale() -> bool:  # the saturation checks count it as saturated (1.0): metrics too old
        return detector.endpoint_saturation(endpoint, time.monotonic(), stale_after) == 1.0

    def noticed() -> bool:  # a bad page: still reachable, stale; hang / error: unreachable
        return stale() if fault == "garbage" else not endpoint.reachable

    bad.metrics_fault = fault
    began = time.perf_counter()
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        went_stale = asyncio.ensure_future(until(stale, f"{bad.address}'s metrics to go stale"))
        seen = asyncio.ensure_future(until(noticed, f"the picker to notice the {fault} /metrics page"))
        while not seen.done():
            status, _, _ = await post(session, envoy.url, chat(f"during {len(statuses)}"))
            statuses.append(status)
        stale_at, noticed_at = await went_stale, await seen
        assert set(statuses) == {200}, "a broken metrics page failed requests"
        before = len(bad.requests)
        after = [await post(session, envoy.url, chat(f"after {i}")) for i in range(20)]
        assert [status for status, _, _ in after] == [200] * 20
        if fault == "garbage":
            assert endpoint.reachable  # it answered: a bad page neither backs off nor marks it unreachable
            assert server.scraper.stats[bad.address].last_error.startswith("bad page")
        else:
            assert len(bad.requests) == before, "requests went to an unreachable endpoint"

        bad.metrics_fault = None
        healed = time.perf_counter()
        back = await until(
            lambda: endpoint.reachable and endpoint.metrics.age() < stale_after, f"{bad.address} to recover"
        )
    setting = "scrape every 0.02 s, timeout 1 s, unreachable after 3 failures"
    report(f"/metrics {fault} -> stale (counted saturated)", stale_at - began, f"staleness {stale_after:g} s")
    if fault != "garbage":
        report(f"/metrics {fault} -> unreachable, routed around", noticed_at - began, setting)
    report(f"/metrics {fault} fixed -> fresh and reachable again", back - healed, "scrape back-off <= 2 s")
    await idle(server)


# ---- 3. every replica down ------------------------------------------------------------------------------


async def _pool_down(upstreams: Any, stack: Any, **config: Any) -> tuple[Any, Any, float, float]:
    """Two model servers, then both gone (listeners closed: connection refused); returns (server, envoy,
    when they went, when the picker saw every endpoint unreachable)."""
    ups = await upstreams(2)
    server, envoy = await stack([u.address for u in ups], **config)
    for upstream in ups:
        await upstream.stop()
    gone = time.perf_counter()
    seen = await until(lambda: not any(e.reachable for e in server.pool), "every endpoint to be unreachable")
    return server, envoy, gone, seen


@pytest.mark.parametrize("flow_control", [False, True], ids=["default", "flow-control"])
async def test_all_replicas_down_is_a_prompt_503(upstreams, stack, report, flow_control: bool) -> None:
    """With every model server down, a request gets the picker's 503 at once, never a hang: the healthy
    filter keeps no unreachable endpoint, so the picker answers 503 no_endpoints naming the filter; with
    flow control the saturated pool holds the request and the picker answers 503 queue_timeout after
    `ttl_s`."""
    config = (
        {"flow_control": {"enabled": True, "ttl_s": 1.0, "no_endpoints_ttl_s": 1.0}} if flow_control else {}
    )
    server, envoy, gone, seen = await _pool_down(upstreams, stack, **config)
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        status, headers, text = await post(session, envoy.url, chat("anyone?"))
        answered = time.perf_counter() - began
    assert status == 503, text
    code = "queue_timeout" if flow_control else "no_endpoints"
    assert headers["x-epp-reject-reason"] == code
    assert headers["x-llm-d-request-dropped-reason"] == code
    error = json.loads(text)["error"]
    assert error["code"] == code
    if not flow_control:
        assert "filter 'healthy' removed all 2" in error["message"]
    report("all replicas down -> every endpoint unreachable", seen - gone)
    setting = "flow control ttl_s 1 s: 503 queue_timeout" if flow_control else "503 no_endpoints"
    report(f"all replicas down -> request answered 503 [{'flow-control' if flow_control else 'default'}]",
           answered, setting)  # fmt: skip
    await idle(server)


async def test_all_replicas_down_routes_blind_when_configured(upstreams, stack) -> None:
    """`healthy: keep_all_if_none: true` (for pools whose /metrics fails while serving works): the picker
    still routes with every endpoint unreachable, so the connection is refused and the 503 is Envoy's."""
    filters = [{"type": "healthy", "params": {"keep_all_if_none": True}}]
    server, envoy, _, _ = await _pool_down(upstreams, stack, scheduling={"filters": filters})
    async with aiohttp.ClientSession() as session:
        status, headers, text = await post(session, envoy.url, chat("anyone?"))
    assert status == 503 and "x-epp-reject-reason" not in headers and "upstream connect error" in text
    await idle(server)


# ---- 4. the picker restarted while Envoy keeps running ----------------------------------------------------

# (id, Envoy shape, EnvoyOptions extras, what a request gets while the picker is down, what a request waiting
# for its response headers gets when the picker dies)
PICKER_OUTAGE = [
    ("gateway-failclose", "gateway", {}, (500, "ext_proc"), 500),
    # FULL_DUPLEX_STREAMED request bodies: Envoy (1.40) does not fail open, at any point of the request.
    ("gateway-failopen", "gateway", {"extproc": {"failure_mode_allow": True}}, (500, "ext_proc"), 500),
    ("buffered-failclose", "buffered", {}, (500, "ext_proc"), 500),
    # BUFFERED: fails open, to the ORIGINAL_DST cluster without the destination header: no host to go to.
    ("buffered-failopen", "buffered", {"extproc": {"failure_mode_allow": True}},
     (503, "no healthy upstream"), 200),
    # A STATIC pool with the override_host policy falls back to round-robin without the header.
    ("override-host-buffered-failopen", "override-host",
     {"extproc": {"failure_mode_allow": True, "message_timeout": "5s"},
      "processing_mode": {"request_body_mode": "BUFFERED"}}, (200, "round-robin"), 200),
]  # fmt: skip


@pytest.mark.parametrize(("label", "shape", "options", "outage", "waiting"), PICKER_OUTAGE,
                         ids=[p[0] for p in PICKER_OUTAGE])  # fmt: skip
async def test_the_picker_restarted_under_a_running_envoy(
    upstreams, report, label: str, shape: str, options: dict[str, Any], outage: tuple[int, str], waiting: int
) -> None:
    """The picker (a child process on a fixed port) is SIGKILLed while Envoy runs, then started again.
    A stream past its first response chunk survives (the picker had already let go of it); a request
    waiting for its response headers fails with FailClose and carries on with FailOpen; requests during
    the outage get the configured failure mode's answer at once (never a hang); once the picker is back,
    Envoy reconnects and the next requests are routed by it."""
    from epp_lab.envoy_launcher import Envoy, EnvoyOptions

    ups = await upstreams(2, sse_events=3, hold_after_first=True)
    pool = [u.address for u in ups]
    port = free_port()
    picker = procs.picker(pool, extproc_port=port, extra=["--scrape-interval", "0.02"])
    envoy = Envoy(EnvoyOptions(shape=shape, epp_port=port, pool=pool, **options))
    await picker.start()
    try:
        await envoy.start()
        async with aiohttp.ClientSession() as session:
            await _picker_outage(session, envoy, picker, ups, report, label, outage, waiting)
    finally:
        for upstream in ups:
            upstream.release.set()
        await envoy.stop()
        await picker.stop()


async def _picker_outage(
    session: aiohttp.ClientSession, envoy: Any, picker: procs.Child, ups: list[Any], report: Any,
    label: str, outage: tuple[int, str], waiting: int,
) -> None:  # fmt: skip
    def routed(status: int, text: str) -> bool:  # the upstream saw the picker's destination header
        return status == 200 and json.loads(text).get("destination") in {u.address for u in ups}

    status, _, text = await post(session, envoy.url, chat("before"))
    assert routed(status, text), text
    # A stream that has its first chunk (the picker has ended its ext_proc stream), and a request that
    # waits at the model server for its response headers (the picker's stream is still open).
    stream = Stream(session, envoy.url, chat("streaming", stream=True), {}, events=1)
    async with asyncio.timeout(HANG_GUARD_S):
        await stream.started.wait()
    assert stream.status == 200 and not stream.task.done()
    gate = asyncio.Event()
    arrived = sum(len(u.requests) for u in ups)
    for upstream in ups:
        upstream.gate = gate
    held = asyncio.ensure_future(post(session, envoy.url, chat("held")))
    await until(
        lambda: sum(len(u.requests) for u in ups) > arrived, "the held request to reach a model server"
    )
    for upstream in ups:
        upstream.gate = None

    killed = time.perf_counter()
    await picker.kill()
    # Outage: every request gets the failure mode's answer at once.
    answers = []
    for i in range(3):
        began = time.perf_counter()
        status, _, text = await post(session, envoy.url, chat(f"outage {i}"))
        answers.append((status, text, time.perf_counter() - began))
    expected_status, expected_text = outage
    for status, text, _ in answers:
        assert status == expected_status, text
        if expected_status == 200:
            assert json.loads(text)["destination"] is None  # passed without the picker, by the cluster's LB
        elif expected_text == "no healthy upstream":
            assert text == expected_text
    gate.set()
    status, _, text = await held
    assert status == waiting, text
    for upstream in ups:
        upstream.release.set()
    await stream.task
    assert stream.complete, stream.text

    # The picker comes back at the same port; Envoy reconnects on the next request.
    spawned = time.perf_counter()
    await picker.start()
    ready = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        status, _, text = await post(session, envoy.url, chat(f"after {attempts}"))
        if routed(status, text):
            break
    first_routed = time.perf_counter()
    slowest = max(seconds for _, _, seconds in answers)
    report(f"picker down -> requests answered {expected_status} [{label}]", slowest,
           f"slowest of 3; FailClose/Open: {expected_text}")  # fmt: skip
    startup = f"ready (start-up, first scrape) after {ready - spawned:.3f} s, then {attempts} request(s)"
    report(f"picker restart: process start -> first request routed by it [{label}]", first_routed - spawned,
           startup)  # fmt: skip
    report(f"picker restart: ready -> first request routed by it (Envoy reconnects) [{label}]",
           first_routed - ready, f"kill -> routed again {first_routed - killed:.2f} s")  # fmt: skip


# ---- 5. Envoy restarted while the picker runs -------------------------------------------------------------


async def test_envoy_restarted_under_a_running_picker(upstreams, stack, report) -> None:
    """Envoy is SIGKILLed while three requests wait at the model servers (their ext_proc streams open at
    the picker): the picker's streams end and its in-flight counts return to zero; the clients see their
    connection fail, not a hang. Envoy started again on the same ports routes through the same picker."""
    ups = await upstreams(2)
    server, envoy = await stack([u.address for u in ups])
    gate = asyncio.Event()
    for upstream in ups:
        upstream.gate = gate
    async with aiohttp.ClientSession() as session:
        held = [asyncio.ensure_future(post(session, envoy.url, chat(f"held {i}"))) for i in range(3)]
        await until(lambda: sum(len(u.requests) for u in ups) == 3, "three requests at the model servers")
        assert server.servicer.active_streams == 3
        assert sum(e.inflight_requests for e in server.pool) == 3

        assert envoy.child is not None
        # The picker runs on this loop: it may see the resets before kill() returns.
        killed = time.perf_counter()
        await envoy.child.kill()
        released = await idle(server)
        outcomes = await asyncio.gather(*held, return_exceptions=True)
        assert all(isinstance(o, aiohttp.ClientError) for o in outcomes), outcomes
    gate.set()
    for upstream in ups:
        upstream.gate = None

    await envoy.stop()
    began = time.perf_counter()
    await envoy.start()  # the same listener and admin ports
    ready = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        status, _, text = await post(session, envoy.url, chat("after"))
    routed = time.perf_counter()
    assert status == 200 and json.loads(text)["destination"] in {u.address for u in ups}, text
    await idle(server)
    report("Envoy killed -> picker's streams and in-flight counts at zero", released - killed)
    report("Envoy restart: start -> ready", ready - began)
    report("Envoy restart: ready -> first request routed", routed - ready, "the picker never restarted")


# ---- 6. clients that vanish -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["gateway", "buffered"])
async def test_a_client_gone_mid_request_body(upstreams, stack, report, shape: str) -> None:
    """The client sends its headers and part of a declared 100 kB body, then its connection dies: the
    picker's stream (collecting the body, or waiting for Envoy's buffered body) ends, nothing was counted in
    flight and nothing reached a model server."""
    ups = await upstreams(2)
    server, envoy = await stack([u.address for u in ups], shape=shape)
    messages = server.servicer.messages
    part = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 4000
    writer = await open_request(envoy.options.listen_port, part, declared=100_000)
    # FULL_DUPLEX_STREAMED: the headers and a first body chunk reach the picker; BUFFERED: the headers.
    await until(lambda: server.servicer.messages >= messages + (2 if shape == "gateway" else 1),
                "the picker to receive the request so far")  # fmt: skip
    assert server.servicer.active_streams == 1
    await vanish(writer)
    gone = time.perf_counter()
    released = await idle(server)
    assert all(u.requests == [] for u in ups)
    report(f"client gone mid-body -> picker stream ended [{shape}]", released - gone)


async def test_a_client_gone_while_its_request_waits_for_response_headers(upstreams, stack, report) -> None:
    """The request is at the model server (no response headers yet; the picker's stream is open and the
    endpoint counts it in flight) when the client's connection dies: Envoy resets the request and the
    picker's stream, and the in-flight count returns to zero."""
    ups = await upstreams(1)
    ups[0].gate = asyncio.Event()
    server, envoy = await stack([ups[0].address])
    _, writer = await send_request(envoy.options.listen_port, chat("waits"))
    await until(lambda: len(ups[0].requests) == 1, "the request to reach the model server")
    assert server.servicer.active_streams == 1 and server.pool.get(ups[0].address).inflight_requests == 1  # type: ignore[union-attr]
    await vanish(writer)
    gone = time.perf_counter()
    released = await idle(server)
    ups[0].gate.set()
    report("client gone before response headers -> in-flight count at zero", released - gone)


@pytest.mark.parametrize("shape", ["gateway", "ai-gateway"])
async def test_a_client_gone_mid_response_stream(upstreams, stack, report, shape: str) -> None:
    """The client reads the first SSE event of a stream, then its connection dies. In the gateway shape
    the picker let go of the stream at its first chunk (first-byte mode) and nothing changes; in the
    AI-gateway shape (FULL_DUPLEX_STREAMED responses) the picker follows every chunk: its stream ends and
    the in-flight count returns to zero."""
    ups = await upstreams(1, sse_events=5, hold_after_first=True)
    server, envoy = await stack([ups[0].address], shape=shape)
    reader, writer = await send_request(envoy.options.listen_port, chat("streams", stream=True))
    await read_until(reader, b"data: ")
    endpoint = server.pool.get(ups[0].address)
    assert endpoint is not None
    following = shape == "ai-gateway"
    if following:
        assert server.servicer.active_streams == 1 and endpoint.inflight_requests == 1
    else:
        await idle(server)  # already let go: first-byte mode
    await vanish(writer)
    gone = time.perf_counter()
    released = await idle(server)
    ups[0].release.set()
    why = "the picker follows every chunk" if following else "the picker had let go at the first chunk"
    report(f"client gone mid-stream -> picker state at zero [{shape}]", released - gone, why)


async def test_a_client_gone_while_queued(upstreams, stack, report) -> None:
    """Flow control holds the request (the only endpoint shows 50 waiting, the gate's threshold is 10); the
    client's connection dies: the queue slot is freed at once, nothing is counted in flight, and nothing is
    sent on its behalf when capacity frees."""
    [up] = await upstreams(1)
    server, envoy = await stack(
        [up.address], scheduling={"seed": 11, "scrape": {"interval_s": 1e6}},  # only scrape_all() scrapes
        flow_control={"enabled": True, "queue_threshold": 10},
    )  # fmt: skip
    flow = server.director.flow
    up.metrics.waiting = 50
    assert await server.scraper.scrape_all() == 1
    _, writer = await send_request(envoy.options.listen_port, chat("queued"))
    await until(lambda: flow.size == 1, "the request to be queued")
    assert server.servicer.active_streams == 1 and flow.bytes > 0
    await vanish(writer)
    gone = time.perf_counter()
    released = await idle(server)
    up.metrics.waiting = 0
    assert await server.scraper.scrape_all() == 1
    flow.kick()
    async with aiohttp.ClientSession() as session:  # capacity is back: a new request goes through at once
        status, _, text = await post(session, envoy.url, chat("next"))
    assert status == 200, text
    assert [json.loads(r["body"])["messages"][0]["content"] for r in up.requests] == ["next"]
    await idle(server)
    report("client gone while queued -> queue slot freed", released - gone, "flow control on")


# ---- 7. the Kubernetes API server goes away and comes back ---------------------------------------------


async def test_the_api_server_goes_away_and_comes_back(upstreams, stack, report, caplog) -> None:
    """The picker follows an InferencePool on the stand-in API server. The API server stops (its watches
    are cut, new connections refused, then dropped until the picker has retried a few times): routing
    continues on the last known endpoints and readiness stays SERVING. While it is away the pool changes
    (target ports [a, b] -> [c]); when it is back at the same address, the picker lists again and routes by
    the new pool."""
    import logging

    from support.kube_api import KubeApi, make_pod, make_pool

    api = KubeApi(token=None, bookmark_interval_s=0.2)
    await api.start()
    try:
        a, b, c = await upstreams(3)
        api.put_pool(make_pool("llama", {"app": "llama"}, [a.port, b.port]))
        api.put_pod(make_pod("model-0", "127.0.0.1", {"app": "llama"}))
        server, envoy = await stack([], pool=api.pool_config("llama"))
        async with asyncio.timeout(HANG_GUARD_S):
            await server.discovery.synced.wait()
        before = {a.address, b.address}
        assert {e.address for e in server.pool} == before
        caplog.set_level(logging.WARNING, logger="epp.datalayer.discovery")

        async with aiohttp.ClientSession() as session:
            away = time.perf_counter()  # the picker shares this loop: it may notice before stop() returns
            await api.stop()
            await until(lambda: any("lost the API server" in r.getMessage() for r in caplog.records),
                        "the picker to notice the API server is gone")  # fmt: skip
            noticed = time.perf_counter()
            # Stay away until the pool discovery has retried three times (its back-off grows: 0.5, 1, 2 s):
            # whatever answers at the address meanwhile drops each connection after its request line.
            attempts = 0

            async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                nonlocal attempts
                if b"/inferencepools" in await reader.readline():
                    attempts += 1
                writer.transport.abort()

            dropper = await asyncio.start_server(drop, "127.0.0.1", api.port)
            for i in range(6):  # routing continues on the last known pool
                status, _, text = await post(session, envoy.url, chat(f"away {i}"))
                assert status == 200 and json.loads(text)["upstream"] in before, text
            await until(lambda: attempts >= 3, "the picker to retry the API server")
            dropper.close()
            await dropper.wait_closed()
            assert server.ready and {e.address for e in server.pool} == before

            api.put_pool(make_pool("llama", {"app": "llama"}, [c.port]))  # changed while away
            await api.start(port=api.port)
            back = time.perf_counter()
            changed = await until(
                lambda: {e.address for e in server.pool} == {c.address},
                "the picker to follow the pool changed while the API server was away",
            )
            for i in range(4):
                status, _, text = await post(session, envoy.url, chat(f"back {i}"))
                assert status == 200 and json.loads(text)["upstream"] == c.address, text
        await idle(server)
    finally:
        await api.stop()
    report("API server gone -> the picker notices (keeps the last pool)", noticed - away)
    setting = f"away {back - away:.2f} s, {attempts} failed pool re-lists; back-off 0.5 s doubling to 30 s"
    report("API server back -> first pool change applied", changed - back, setting)
