"""Soak: long steady streaming load through real Envoy and the picker to a simulated fleet whose replicas are
killed and restarted meanwhile. Is anything lost or hung, and do the picker's memory, file descriptors and
tasks stay flat? (issue 13, part 4; README "Reliability")

    .venv/bin/python -m benchmarks.soak.run                  # 10 min: benchmarks/results/soak.{json,md,png}
    .venv/bin/python -m benchmarks.soak.run --minutes 1      # smoke (~1.5 min): out/soak/soak.smoke.*

Set-up (all on 127.0.0.1):
- Fleet: 4 simulated vLLM replicas (H100 / Llama-3.1-8B profile in real time, `--time-scale 1`; 6,000 KV
  blocks of 16 tokens each; an SSE event every 4 tokens), each its own `epp sim --replicas 1` process on a
  fixed port, so that one can be SIGKILLed and started again at the same address (`procs.sim(1, base_port)`).
- The picker: `epp serve` with the embedded defaults (the picker as shipped; `--flow-control` turns flow
  control on), static endpoints, plaintext ext_proc; Envoy: the `gateway` shape (FULL_DUPLEX_STREAMED
  request body, STREAMED response body, first-byte mode).
- Load: real k6 (`soak.js`), `constant-arrival-rate` at `--rate` requests/s for `--minutes`: streamed chat
  completions, 64 output tokens, 16 shared system prompts of ~1,000 tokens plus a unique question, read to
  the end (`data: [DONE]`). Every request that is not ok is logged by k6 with its start, end, status, error
  and the replica that answered.
- Restarts: from `--restart-every`/2 on, every `--restart-every` seconds (default 120) one replica (in turn)
  is SIGKILLed, left down `--down` seconds (default 5), then started again at its address. The picker's view
  is followed on its admin API (`ListEndpoints`): when it marks the replica unreachable, and when reachable
  again.
- Sampling every `--sample` seconds (default 5): the picker's RSS (/proc/<pid>/status VmRSS), open file
  descriptors (/proc/<pid>/fd), and from its /metrics: asyncio tasks (`epp_asyncio_tasks`), open ext_proc
  streams, in-flight requests (sum over endpoints), prefix-index entries (`inference_extension_prefix_
  indexer_size`) against the index's bound (the sum of the per-endpoint capacities the scorer sizes from the
  servers' `cache_config_info`: num_gpu_blocks x block_size x 4 characters per token / 64 characters per
  block), flow-control queue size; Envoy's RSS and fds for context; the load average.

Classification of the requests that were not ok: a request is *on a killed replica* when its time span meets
a kill window (from the kill to the moment the picker marks the replica reachable again) and it failed as a
dead replica makes requests fail: a stream that the replica answered (`x-sim-replica`) and that ended without
`[DONE]`, a 502/503 from Envoy for a refused or reset upstream connection, or a connection error. Anything
else is *lost*; a request still open after k6's timeout (60 s) is *hung*. The target: lost = hung = 0.

Rate: the picker's measured sustainable throughput is 600 requests/s (non-streamed, 8 endpoints,
`overhead.md`, full-duplex) and, for streamed requests in first-byte mode, 2.8 ms of picker CPU per request
(`overhead_streaming.md`, epp/first-chunk): ~357 requests/s per picker core. On this 2-core machine the
picker shares the cores with Envoy, k6 and the four simulated replicas, so the default `--rate` is
DEFAULT_RATE requests/s (see the constant's comment for how it was chosen).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import REPO, RESULTS_DIR, VENV_BIN, git, load_average, machine_info, tool_version
from benchmarks.soak import report
from epp._generated.epp_admin_pb2_grpc import AdminStub
from epp.config import CHARS_PER_TOKEN
from epp.scheduling.plugins.prefix_cache.index import DEFAULT_BLOCK_CHARS
from epp_lab import procs
from epp_lab.envoy_launcher import Envoy, EnvoyOptions, find_envoy, free_port
from epp_lab.sim.config import DEFAULT_MODEL
from epp_lab.sim.profiles import BLOCK_SIZE

K6_SCRIPT = Path(__file__).with_name("soak.js")
K6 = VENV_BIN / "k6"
REPLICAS = 4
TIME_SCALE = 1.0
NUM_GPU_BLOCKS = 6000
STREAM_INTERVAL = 4
MAX_TOKENS = 64
PICKER_SUSTAINABLE_RPS = 600  # overhead.md: epp, full-duplex, 8 endpoints (non-streamed requests)
PICKER_STREAMED_RPS_PER_CORE = 357  # overhead_streaming.md: 1 core / 2.8 ms per streamed request (first-byte)
DEFAULT_RATE = 100
"""Requests/s: a sixth of the picker's sustainable 600/s and ~0.3 of what one picker core sustains for
streamed requests (357/s), i.e. as near as this 2-core machine allows while it also runs Envoy, k6 and four
simulated replicas streaming every response (at 150/s in a trial the machine itself was saturated)."""
HANG_GUARD_S = 90.0
CONNECTION_FAILURE = ("upstream connect error", "connection", "reset", "EOF", "refused", "broken pipe")


@dataclass
class Restart:
    replica: int
    address: str
    kill_at: float  # epoch seconds
    unreachable_at: float | None = None  # the picker stopped counting it (ready pods dropped)
    ready_at: float | None = None  # started again: the simulator serves
    back_at: float | None = None  # the picker counts it again


@dataclass
class Run:
    started_at: float = 0.0  # epoch seconds when k6 started
    samples: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- observing the picker --------------------------------------------------------------------------------


def proc_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The picker's /metrics as {name: value}, summed over label sets (gauges and counters alike)."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def sample(session: aiohttp.ClientSession, metrics_url: str, picker_pid: int, envoy_pid: int,
                 run: Run) -> dict[str, Any]:  # fmt: skip
    m = await scrape(session, metrics_url)
    return {
        "t": round(time.time() - run.started_at, 2) if run.started_at else 0.0,
        "rss_bytes": proc_rss_bytes(picker_pid),
        "fds": proc_fds(picker_pid),
        "tasks": m.get("epp_asyncio_tasks"),
        "active_streams": m.get("epp_extproc_active_streams"),
        "inflight": m.get("epp_endpoint_inflight_requests"),
        "prefix_index_entries": m.get("inference_extension_prefix_indexer_size"),
        "queue_size": m.get("inference_extension_flow_control_queue_size", 0.0),
        "streams_total": m.get("epp_extproc_streams_total", m.get("epp_extproc_streams")),
        "envoy_rss_bytes": proc_rss_bytes(envoy_pid),
        "envoy_fds": proc_fds(envoy_pid),
        "load_average": load_average(),
    }


async def sampler(session: aiohttp.ClientSession, metrics_url: str, picker_pid: int, envoy_pid: int,
                  run: Run, every: float, stop: asyncio.Event) -> None:  # fmt: skip
    while not stop.is_set():
        try:
            run.samples.append(await sample(session, metrics_url, picker_pid, envoy_pid, run))
        except (aiohttp.ClientError, TimeoutError) as err:
            log(f"sample failed: {err!r}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def reachable(admin: Any, address: str) -> bool | None:
    """The picker's verdict on `address` (admin ListEndpoints), None if it does not list it."""
    from epp._generated import epp_admin_pb2 as pb

    reply = await admin.ListEndpoints(pb.ListEndpointsRequest(), timeout=10)
    return next((e.reachable for e in reply.endpoints if e.address == address), None)


async def poll_reachable(admin: Any, address: str, wanted: bool) -> float | None:
    """Poll the picker's verdict on `address` every 0.05 s until it is `wanted`; epoch seconds then, or None
    after the hang guard."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if await reachable(admin, address) == wanted:
            return time.time()
        await asyncio.sleep(0.05)
    return None


# ---- restarting replicas ---------------------------------------------------------------------------------


async def restarter(fleet: list[procs.Child], addresses: list[str], admin: Any, run: Run, seconds: float,
                    every: float, down: float) -> None:  # fmt: skip
    """Kill one replica every `every` seconds (at most every half of the run) from `every`/2 on, while the
    run lasts long enough to see it back; leave it down `down` seconds, start it again at its address;
    follow the picker's verdict."""
    every = min(every, seconds / 2)  # a short (smoke) run restarts a replica too
    at = every / 2
    turn = 0
    while at + down + 10 < seconds:
        await asyncio.sleep(max(0.0, run.started_at + at - time.time()))
        index = turn % len(fleet)
        event = Restart(index, addresses[index], kill_at=time.time())
        run.restarts.append(event)
        await fleet[index].kill()
        event.unreachable_at = await poll_reachable(admin, addresses[index], False)
        await asyncio.sleep(max(0.0, event.kill_at + down - time.time()))
        await fleet[index].start()
        event.ready_at = time.time()
        event.back_at = await poll_reachable(admin, addresses[index], True)
        log(f"replica {index} ({addresses[index]}) killed at {event.kill_at - run.started_at:.0f} s: "
            f"unreachable after {(event.unreachable_at or float('nan')) - event.kill_at:.2f} s, back "
            f"{(event.back_at or float('nan')) - event.ready_at:.2f} s after its restart")  # fmt: skip
        turn += 1
        at += every


# ---- k6 --------------------------------------------------------------------------------------------------


async def run_k6(url: str, rate: int, minutes: float, workdir: Path) -> tuple[dict[str, Any], list[dict]]:
    summary_path, failures_path = workdir / "summary.json", workdir / "failures.jsonl"
    env = {"TARGET": url, "RATE": str(rate), "DURATION": f"{int(minutes * 60)}s", "MODEL": DEFAULT_MODEL,
           "MAX_TOKENS": str(MAX_TOKENS), "SUMMARY": str(summary_path)}  # fmt: skip
    argv = [str(K6), "run", "--quiet", "--no-color", "--no-usage-report", "--log-format", "raw",
            "--log-output", f"file={failures_path}"]  # fmt: skip
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    process = await asyncio.create_subprocess_exec(
        *argv, str(K6_SCRIPT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(workdir),
    )  # fmt: skip
    _, err = await process.communicate()
    if not summary_path.exists():
        raise RuntimeError(f"k6 wrote no summary (exit {process.returncode}): {err.decode()[-2000:]}")
    failures = []
    if failures_path.exists():
        for line in failures_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and "start" in record:
                    failures.append(record)
    return json.loads(summary_path.read_text()), failures


# ---- classification --------------------------------------------------------------------------------------


def classify(failure: dict[str, Any], restarts: list[Restart]) -> str:
    """ "hung", "killed" (on a replica killed meanwhile) or "lost" (see the module docstring)."""
    if failure.get("error_code") == 1050:
        return "hung"
    start, end = failure["start"] / 1000, failure["end"] / 1000
    status, error, head = failure.get("status", 0), failure.get("error", ""), failure.get("head", "")
    for event in restarts:
        window_end = event.back_at or event.ready_at or float("inf")
        if end < event.kill_at or start > window_end:
            continue
        port = event.address.rsplit(":", 1)[1]
        if status == 200 and failure.get("replica") == port:
            return "killed"  # a stream of the killed replica, cut
        if status in (502, 503) and any(word in head for word in CONNECTION_FAILURE):
            return "killed"  # routed there before the picker noticed: connection refused or reset
        if status == 0 and (f"-{port}-" in head or any(word in error for word in CONNECTION_FAILURE)):
            return "killed"  # the connection failed (a stream cut mid-body: its ids name the replica's port)
    return "lost"


# ---- the run ---------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ports = [free_port() for _ in range(REPLICAS)]
    fleet = [
        procs.sim(1, base_port=port, time_scale=args.time_scale, num_gpu_blocks=NUM_GPU_BLOCKS,
                  stream_interval=STREAM_INTERVAL, seed=i)
        for i, port in enumerate(ports)
    ]  # fmt: skip
    config = None
    if args.flow_control:
        config = workdir / "picker.yaml"
        config.write_text("flow_control: {enabled: true}\n")
    run = Run()
    try:
        await asyncio.gather(*(child.start() for child in fleet))
        addresses = [child.info["addresses"][0] for child in fleet]
        picker = procs.picker(addresses, config, extra=["--seed", "1"], extproc_port=free_port())
        await picker.start()
        envoy = Envoy(EnvoyOptions(shape="gateway", epp_port=picker.info["extproc"], pool=addresses))
        try:
            await envoy.start()
            assert picker.pid is not None and envoy.pid is not None
            metrics_url = f"http://127.0.0.1:{picker.info['metrics']}/metrics"
            async with (
                aiohttp.ClientSession() as session,
                grpc.aio.insecure_channel(f"127.0.0.1:{picker.info['admin']}") as channel,
            ):
                admin = AdminStub(channel)
                idle_before = await sample(session, metrics_url, picker.pid, envoy.pid, run)
                stop = asyncio.Event()
                run.started_at = time.time()
                sampling = asyncio.ensure_future(
                    sampler(session, metrics_url, picker.pid, envoy.pid, run, args.sample, stop)
                )
                restarting = asyncio.ensure_future(
                    restarter(fleet, addresses, admin, run, args.minutes * 60, args.restart_every, args.down)
                )  # fmt: skip
                log(f"k6: {args.rate} requests/s for {args.minutes:g} min through {envoy.url}")
                summary, failures = await run_k6(envoy.url, args.rate, args.minutes, workdir)
                ended_at = time.time()
                restarting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await restarting
                stop.set()
                await sampling
                # Settled: the picker's request state back at zero once the load has ended.
                deadline = time.monotonic() + HANG_GUARD_S
                while True:
                    settled = await sample(session, metrics_url, picker.pid, envoy.pid, run)
                    if (
                        settled["active_streams"] == 0 and settled["inflight"] == 0
                    ) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
        finally:
            await envoy.stop()
            await picker.stop()
    finally:
        await asyncio.gather(*(child.stop() for child in fleet))
    for failure in failures:
        failure["class"] = classify(failure, run.restarts)
    bound = REPLICAS * (NUM_GPU_BLOCKS * BLOCK_SIZE * CHARS_PER_TOKEN // DEFAULT_BLOCK_CHARS)
    return {
        "summary": summary,
        "failures": failures,
        "restarts": [asdict(r) for r in run.restarts],
        "samples": run.samples,
        "idle_before": idle_before,
        "settled": settled,
        "started_at": run.started_at,
        "ended_at": ended_at,
        "prefix_index_bound": bound,
        "load_s": args.minutes * 60,
    }


def header(args: argparse.Namespace) -> dict[str, Any]:
    uname = platform.uname()
    return machine_info(
        "soak",
        uname=f"{uname.system} {uname.release} {uname.machine}",
        git_commit=git("rev-parse", "HEAD").strip(),
        git_dirty=bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        envoy=tool_version([find_envoy(), "--version"]),
        k6=tool_version([str(K6), "version"]),
        settings={
            "minutes": args.minutes, "rate": args.rate, "restart_every_s": args.restart_every,
            "down_s": args.down, "sample_s": args.sample, "time_scale": args.time_scale,
            "flow_control": args.flow_control, "replicas": REPLICAS, "num_gpu_blocks": NUM_GPU_BLOCKS,
            "stream_interval": STREAM_INTERVAL, "max_tokens": MAX_TOKENS, "envoy_shape": "gateway",
            "picker_sustainable_rps": PICKER_SUSTAINABLE_RPS,
            "picker_streamed_rps_per_core": PICKER_STREAMED_RPS_PER_CORE,
        },
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the k6 load (default 10)")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help=f"requests/s (default {DEFAULT_RATE})")
    parser.add_argument("--restart-every", type=float, default=120.0, help="seconds between replica kills")
    parser.add_argument("--down", type=float, default=5.0, help="seconds a killed replica stays down")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples of the picker")
    parser.add_argument("--time-scale", type=float, default=TIME_SCALE, help="simulator time scale")
    parser.add_argument("--flow-control", action="store_true", help="run the picker with flow control on")
    parser.add_argument("--out", type=Path, help="results directory (default: benchmarks/results for runs "
                        "of 10 min or more, out/soak for shorter ones)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.restart_every <= 2 * args.down:
        parser.error("--restart-every must be more than twice --down")
    smoke = args.minutes < 10
    out = args.out or (REPO / "out" / "soak" if smoke else RESULTS_DIR)
    name = "soak.smoke" if smoke else "soak"
    if args.flow_control:
        name += ".flow-control"
    head = header(args)
    log(f"{head['command']} -> {out / name}.{{json,md,png}}")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
    head["load_average_at_end"] = load_average()
    document = report.build(head, result)
    report.write(out, name, document)
    totals = document["requests"]
    log(f"sent {totals['sent']}, ok {totals['ok']}, on killed replicas {totals['on_killed_replica']}, "
        f"lost {totals['lost']}, hung {totals['hung']} -> {out / name}.md")  # fmt: skip
    return 0 if totals["lost"] == 0 and totals["hung"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
