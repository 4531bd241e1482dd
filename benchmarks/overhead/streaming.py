"""Picker cost on streamed responses: what each way of keeping response chunks away from the picker saves.

Real LLM traffic streams one SSE event per token. Every arm sends the same closed-loop load through real
Envoy to a fresh simulated vLLM fleet (`epp_lab.sim`, 4 replicas, H100 profile at `--time-scale`, one token
per SSE event): `--requests` streamed completions of `--tokens` output tokens, `--concurrency` at a time.
Arms (each = Envoy shape + ext_proc server + how far it follows responses):

    no-extproc             Envoy `direct`, ROUND_ROBIN: no picker at all (Envoy's own cost)
    noop/echo-all          `ai-gateway` (FULL_DUPLEX_STREAMED both ways, Envoy AI Gateway's default):
                           the no-op ext_proc echoes every chunk: the grpc.aio floor of that path
    epp/echo-all           the same with epp (pre-serialized echo)
    noop/first-chunk       `gateway` (response STREAMED): the no-op stops after the first chunk
    epp/first-chunk        `gateway`: epp's default (stops after the first chunk; every 64th followed)
    epp/headers-only       `gateway` with response body NONE, trailers SEND (the end still signalled)
    epp/buffered-override  `buffered` with response BUFFERED + allow_mode_override: epp asks for STREAMED,
                           then stops after the first chunk (Envoy AI Gateway with its `buffered` annotation)
    epp/follow-full        `gateway` with `response.follow: full`: every chunk acknowledged to the end

Measured per arm (arms back to back, repeated in rotated order; medians): CPU seconds of the ext_proc server
and of Envoy from /proc (per request, and per token event = per request / tokens), TTFT and inter-token
latency p50/p99 seen by the client (gaps between SSE events; "added" = minus the no-extproc arm's), and the
streamed tokens per second one core of picker sustains (= tokens / picker CPU seconds).

The client is Python (aiohttp), not k6: k6 cannot timestamp SSE events as they arrive, and only the picker's
and Envoy's CPU are measured, not the client's.

    .venv/bin/python -m benchmarks.overhead.streaming [--quick] [--arms ...]

Writes benchmarks/results/overhead_streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from benchmarks.common import REPO, RESULTS_DIR, git, machine_info, process_cpu_seconds, write_json
from epp_lab.envoy_launcher import Envoy, EnvoyOptions
from epp_lab.procs import Child, picker_argv, sim
from epp_lab.sim.config import DEFAULT_MODEL
from epp_lab.tables import markdown_table


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    server: str | None  # None | "noop" | "epp"
    shape: str
    processing_mode: dict[str, str] = field(default_factory=dict)
    extproc: dict[str, Any] = field(default_factory=dict)
    picker_config: dict[str, Any] = field(default_factory=dict)
    noop_args: tuple[str, ...] = ()


ARMS = (
    Arm("no-extproc", None, "direct"),
    Arm("noop/echo-all", "noop", "ai-gateway"),
    Arm("epp/echo-all", "epp", "ai-gateway"),
    Arm("noop/first-chunk", "noop", "gateway", noop_args=("--response", "first-byte")),
    Arm("epp/first-chunk", "epp", "gateway"),
    Arm("epp/headers-only", "epp", "gateway", processing_mode={"response_body_mode": "NONE"}),
    Arm(
        "epp/buffered-override",
        "epp",
        "buffered",
        processing_mode={"response_body_mode": "BUFFERED"},
        extproc={"allow_mode_override": True},
    ),
    Arm("epp/follow-full", "epp", "gateway", picker_config={"response": {"follow": "full"}}),
)
ARM_NAMES = tuple(a.name for a in ARMS)

# Targets (issue: "Stop paying per token").
TARGET_CHEAP_CPU_MS = 3.0  # picker CPU per 256-token streamed request on the cheap path
TARGET_ENVOY_RATIO = 1.3  # Envoy CPU per request on the cheap path vs the no-extproc arm
TARGET_ECHO_RATIO = 1.1  # epp vs no-op CPU per token event when every chunk is echoed


@dataclass(slots=True)
class Settings:
    requests: int = 200
    tokens: int = 256
    concurrency: int = 32
    time_scale: float = 0.5
    replicas: int = 4
    repeats: int = 3
    seed: int = 7


# -- the client -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    status: int
    ttft_s: float
    gaps_s: list[float]  # between consecutive SSE events carrying tokens
    events: int


async def _one(session: aiohttp.ClientSession, url: str, i: int, tokens: int) -> Outcome:
    body = {
        "model": DEFAULT_MODEL,
        "prompt": f"[request {i}] " + "stream me some tokens please " * 20,
        "max_tokens": tokens,
        "stream": True,
    }
    start = time.perf_counter()
    times: list[float] = []
    async with session.post(url + "/v1/completions", data=orjson.dumps(body)) as response:
        if response.status != 200:
            await response.read()
            return Outcome(response.status, -1.0, [], 0)
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Outcome(200, times[0] - start if times else -1.0, gaps, len(times))


async def drive(url: str, settings: Settings) -> tuple[list[Outcome], float]:
    """Closed loop: `concurrency` workers send `requests` requests in all; returns outcomes and wall time."""
    counter = iter(range(settings.requests))
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            for i in counter:
                outcomes.append(await _one(session, url, i, settings.tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
        wall = time.perf_counter() - start
    return outcomes, wall


# -- one arm -----------------------------------------------------------------------------------------------


def _server(arm: Arm, pool: list[str], workdir: Path) -> Child:
    if arm.server == "noop":
        argv = [sys.executable, "-m", "benchmarks.overhead.noop_extproc", "--destination", pool[0],
                "--port", "0", *arm.noop_args]  # fmt: skip
        return Child("noop", argv, ready_file=True, cwd=REPO, log=workdir / "noop.log")
    config = workdir / "picker.yaml"
    config.write_text(yaml.safe_dump({"scheduling": {"seed": 1}, **arm.picker_config}))
    return Child("epp", picker_argv(pool, config), ready_file=True, cwd=REPO, log=workdir / "epp.log")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_arm(arm: Arm, settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="epp-streaming-") as tmp:
        workdir = Path(tmp)
        fleet = sim(settings.replicas, time_scale=settings.time_scale, seed=settings.seed, stream_interval=1)
        async with fleet:
            pool = fleet.info["addresses"]
            server = _server(arm, pool, workdir) if arm.server else None
            if server is not None:
                await server.start()
            try:
                options = EnvoyOptions(
                    shape=arm.shape,
                    pool=pool,
                    epp_port=int(server.info["extproc"]) if server else 9002,
                    processing_mode=dict(arm.processing_mode),
                    extproc=dict(arm.extproc),
                )
                async with Envoy(options) as envoy:
                    pids = {"server": server.pid if server else None, "envoy": envoy.pid}
                    await drive(envoy.url, Settings(requests=8, tokens=8, concurrency=4))  # warm-up
                    before = {k: process_cpu_seconds(p) if p else None for k, p in pids.items()}
                    outcomes, wall = await drive(envoy.url, settings)
                    after = {k: process_cpu_seconds(p) if p else None for k, p in pids.items()}
            finally:
                if server is not None:
                    await server.stop()
    ok = [o for o in outcomes if o.status == 200]
    cpu = {k: None if before[k] is None or after[k] is None else after[k] - before[k] for k in pids}  # type: ignore[operator]
    events = sum(o.events for o in ok)
    per_request = {k: None if v is None else v / max(1, len(ok)) for k, v in cpu.items()}
    gaps = [g for o in ok for g in o.gaps_s]
    server_cpu = cpu["server"]
    return {
        "arm": arm.name,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "events_per_request": round(events / max(1, len(ok)), 1),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(events / wall, 1),
        "server_cpu_ms_per_request": None
        if per_request["server"] is None
        else round(per_request["server"] * 1e3, 3),
        "server_cpu_us_per_event": None
        if server_cpu is None
        else round(server_cpu / max(1, events) * 1e6, 2),
        "envoy_cpu_ms_per_request": round(per_request["envoy"] * 1e3, 3) if per_request["envoy"] else None,
        "tokens_per_picker_core_s": None if not server_cpu else round(events / server_cpu),
        "ttft_p50_ms": _ms(_percentile([o.ttft_s for o in ok], 0.5)),
        "ttft_p99_ms": _ms(_percentile([o.ttft_s for o in ok], 0.99)),
        "itl_p50_ms": _ms(_percentile(gaps, 0.5)),
        "itl_p99_ms": _ms(_percentile(gaps, 0.99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


# -- the run ---------------------------------------------------------------------------------------------


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in ARM_NAMES:
        rows = [r for r in runs if r["arm"] == name]
        if not rows:
            continue
        merged: dict[str, Any] = {"arm": name, "repeats": len(rows)}
        for key, value in rows[0].items():
            if key == "arm":
                continue
            values = [r[key] for r in rows if r[key] is not None]
            merged[key] = (
                None
                if not values
                else (statistics.median(values) if isinstance(value, int | float) else value)
            )
        out.append(merged)
    base = next((r for r in out if r["arm"] == "no-extproc"), None)
    for row in out:
        if base is not None:
            for key in ("itl_p50_ms", "itl_p99_ms", "ttft_p50_ms"):
                if row.get(key) is not None and base.get(key) is not None:
                    row[key.replace("_ms", "_added_ms")] = round(row[key] - base[key], 3)
            if row.get("envoy_cpu_ms_per_request") and base.get("envoy_cpu_ms_per_request"):
                row["envoy_vs_no_extproc"] = round(
                    row["envoy_cpu_ms_per_request"] / base["envoy_cpu_ms_per_request"], 2
                )
    return out


def evaluate(rows: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    by = {r["arm"]: r for r in rows}
    goals = []
    cheap = by.get("epp/first-chunk")
    if cheap is not None:
        ms = cheap["server_cpu_ms_per_request"]
        goals.append({
            "target": f"cheap path (epp/first-chunk): picker CPU per {tokens}-token streamed request <= "
                      f"{TARGET_CHEAP_CPU_MS} ms",
            "value": f"{ms} ms", "met": ms is not None and ms <= TARGET_CHEAP_CPU_MS,
        })  # fmt: skip
        ratio = cheap.get("envoy_vs_no_extproc")
        goals.append({
            "target": f"cheap path: Envoy CPU per request <= {TARGET_ENVOY_RATIO}x the no-extproc arm",
            "value": f"{ratio}x", "met": ratio is not None and ratio <= TARGET_ENVOY_RATIO,
        })  # fmt: skip
    echo, noop = by.get("epp/echo-all"), by.get("noop/echo-all")
    if echo and noop and echo["server_cpu_us_per_event"] and noop["server_cpu_us_per_event"]:
        ratio = round(echo["server_cpu_us_per_event"] / noop["server_cpu_us_per_event"], 2)
        goals.append({
            "target": f"forced echo (every chunk): epp <= {TARGET_ECHO_RATIO}x the no-op's CPU per token "
            "event",
            "value": f"{ratio}x ({echo['server_cpu_us_per_event']} vs {noop['server_cpu_us_per_event']} us)",
            "met": ratio <= TARGET_ECHO_RATIO,
        })  # fmt: skip
    return goals


COLUMNS = (
    "arm", "server_cpu_ms_per_request", "server_cpu_us_per_event", "envoy_cpu_ms_per_request",
    "envoy_vs_no_extproc", "tokens_per_picker_core_s", "ttft_p50_ms", "itl_p50_ms", "itl_p50_added_ms",
    "itl_p99_ms", "itl_p99_added_ms", "events_per_request", "errors",
)  # fmt: skip


def markdown(doc: dict[str, Any]) -> str:
    head, s = doc["header"], doc["settings"]
    lines = [
        "# Picker cost on streamed responses",
        "",
        f"`{head['command']}` on {head['date_utc']} (nproc {head['nproc']}, "
        f"{(head['machine_memory_bytes'] or 0) / 2**30:.1f} GiB, load average at start "
        f"{head['load_average_at_start']}; commit {head.get('commit', '?')}). {s['requests']} streamed "
        f"completions x {s['tokens']} tokens (one SSE event per token), {s['concurrency']} concurrent, "
        f"through real Envoy to a fresh simulated fleet of {s['replicas']} replicas at time scale "
        f"{s['time_scale']}; medians of {s['repeats']} repeats (arms back to back, rotated order). The "
        "machine is shared: compare arms within this run. See the module docstring of "
        "`benchmarks/overhead/streaming.py` for the arms.",
        "",
        markdown_table(COLUMNS, [[r.get(c) for c in COLUMNS] for r in doc["rows"]]),
        "## Targets",
        "",
        markdown_table(
            ["target", "value", "met"],
            [[g["target"], g["value"], "yes" if g["met"] else "**no**"] for g in doc["targets"]],
        ),
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings(
        requests=args.requests, tokens=args.tokens, concurrency=args.concurrency, time_scale=args.time_scale,
        repeats=args.repeats,
    )  # fmt: skip
    arms = [a for a in ARMS if a.name in args.arms]
    runs: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        order = arms[repeat % len(arms) :] + arms[: repeat % len(arms)]
        for arm in order:
            row = await run_arm(arm, settings)
            row["repeat"] = repeat
            runs.append(row)
            print(orjson.dumps(row).decode(), flush=True)
    rows = median_rows(runs)
    doc = {
        "header": machine_info("overhead_streaming", commit=git("rev-parse", "--short", "HEAD").strip()),
        "settings": asdict(settings),
        "rows": rows,
        "targets": evaluate(rows, settings.tokens),
        "runs": runs,
    }
    out = Path(args.out)
    write_json(out, doc)
    out.with_suffix(".md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat (default 3)")
    parser.add_argument("--arms", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--time-scale", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS_DIR / "overhead_streaming.json"))
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
