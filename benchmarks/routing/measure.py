"""One measured run: a fresh simulated fleet, one arm in front of it, the k6 replay of one request sequence,
then the fleet's counters and every process's CPU time.

CPU accounting (to show neither the simulator nor k6 is the bottleneck, and how busy the shared machine
was): utime + stime of each process from /proc/<pid>/stat before and after the replay; k6's from
`getrusage(RUSAGE_CHILDREN)` around its run (it is the only child reaped meanwhile); the whole machine's
busy time from /proc/stat, so that "other" = machine - ours is the noise from other tenants.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import (
    REPO,
    VENV_BIN,
    children_cpu_seconds,
    machine_busy_seconds,
    process_cpu_seconds,
)
from benchmarks.routing import arms
from benchmarks.routing.peers import PeerStatus
from benchmarks.routing.workloads import REPLICAS, TIME_SCALE, Workload, write_requests
from epp_lab import procs
from epp_lab.loadgen import client

K6_SCRIPT = REPO / "benchmarks" / "k6" / "routing.js"
K6 = VENV_BIN / "k6"


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process; NaN once it is gone (so a sum over processes can skip it)."""
    cpu = process_cpu_seconds(pid)
    return float("nan") if cpu is None else cpu


async def fleet_totals(address: str, time_scale: float) -> dict[str, Any]:
    """The fleet's summed counters from /sim/stats, plus the server-side mean TTFT in real seconds (the
    replicas' own TTFT means weighted by completed requests, x the time scale): an independent check of
    the clients' TTFT."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}/sim/stats") as response:
        doc = await response.json()
    total = dict(doc["total"])
    done = sum(r["completed"] for r in doc["replicas"])
    weighted = sum(r["ttft_mean_s"] * r["completed"] for r in doc["replicas"])
    total["server_ttft_mean_s"] = weighted / done * time_scale if done else None
    return total


async def run_k6(url: str, requests_file: Path, tags: dict[str, str], workdir: Path) -> tuple[dict, float]:
    """Replay the sequence with k6; returns (handleSummary JSON, k6 CPU seconds)."""
    summary_file = workdir / "summary.json"
    env_args: list[str] = []
    for key, value in {
        "TARGET": url,
        "REQUESTS": str(requests_file),
        "SUMMARY": str(summary_file),
        **{k.upper(): v for k, v in tags.items()},
    }.items():
        env_args += ["-e", f"{key}={value}"]
    before = children_cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        str(K6),
        "run",
        "--quiet",
        "--no-color",
        "--no-usage-report",
        *env_args,
        str(K6_SCRIPT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(workdir),
    )
    _, err = await process.communicate()
    k6_cpu = children_cpu_seconds() - before
    if not summary_file.exists():
        raise RuntimeError(f"k6 wrote no summary (exit {process.returncode}): {err.decode()[-1500:]}")
    # k6 exits 99 when a threshold fails: the run is still a result (thresholds are reported with it).
    return json.loads(summary_file.read_text()), k6_cpu


async def run_once(
    arm: str,
    workload: Workload,
    qps: float,
    seed: int,
    statuses: dict[str, PeerStatus],
    python_client: bool = False,
    time_scale: float = TIME_SCALE,
) -> dict[str, Any]:
    """One arm x workload x QPS x seed on a fresh fleet. With `python_client`, the replay is done by
    `epp_lab.loadgen.client` instead of k6 (the TTFT cross-check)."""
    requests = workload.requests(qps, seed)
    scorers = arms.epp_scorers(arm) if arm.startswith("epp") else None  # what the picker will load
    with tempfile.TemporaryDirectory(prefix="routing-") as tmp:
        workdir = Path(tmp)
        requests_file = workdir / "requests.json"
        write_requests(requests_file, requests)
        sim_options = {**workload.sim_options(seed, time_scale), **arms.sim_options(arm)}
        async with procs.sim(REPLICAS, **sim_options) as fleet:
            workers = fleet.info["addresses"]
            async with arms.start(arm, workers, seed, statuses) as running:
                assert fleet.pid is not None
                pids = {"sim": fleet.pid, **running.pids}
                cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items()}
                busy0, t0 = machine_busy_seconds()[0], time.perf_counter()
                if python_client:
                    results, wall = await client.run(running.url, requests)
                    summary, k6_cpu = _python_summary(results, wall), 0.0
                else:
                    tags = {"arm": arm, "workload": workload.name, "qps": f"{qps:g}"}
                    summary, k6_cpu = await run_k6(running.url, requests_file, tags, workdir)
                wall = time.perf_counter() - t0
                busy = machine_busy_seconds()[0] - busy0
                cpu = {name: process_cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
                totals = await fleet_totals(workers[0], time_scale)
    cpu["k6" if not python_client else "python-client"] = k6_cpu
    ours = sum(v for v in cpu.values() if v == v)
    return {
        "arm": arm,
        "workload": workload.name,
        "qps": qps,
        "seed": seed,
        "client": "python" if python_client else "k6",
        "epp_scorers": scorers,
        "summary": summary,
        "fleet": {
            k: totals.get(k)
            for k in (
                "prompt_tokens",
                "cached_tokens",
                "prefix_hit_rate",
                "lora_loads",
                "completed",
                "preemptions",
                "generated_tokens",
                "requests_received",
                "server_ttft_mean_s",
            )
        },
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_util": {k: (v / wall if wall else 0.0) for k, v in cpu.items()},
        "machine_busy_cores": busy / wall if wall else 0.0,
        "other_tenants_cores": max(0.0, busy - ours) / wall if wall else 0.0,
    }


def _python_summary(results: list[client.Result], wall: float) -> dict[str, Any]:
    s = client.summarize(results, wall)
    ok = [r for r in results if r.status == 200 and r.ttft_s >= 0]
    return {
        "requests": len(results),
        "ok": s["ok"],
        "errors": s["errors"],
        "rejected_429": sum(1 for r in results if r.status == 429),
        "wall_s": wall,
        "ttft": {
            "avg_s": sum(r.ttft_s for r in ok) / len(ok) if ok else None,
            "p50_s": s["ttft_p50_s"],
            "p90_s": s["ttft_p90_s"],
            "p99_s": s["ttft_p99_s"],
            "max_s": max((r.ttft_s for r in ok), default=None),
        },
        "e2e": {"p50_s": s["e2e_p50_s"], "p99_s": s["e2e_p99_s"]},
        "tpot": {"p50_s": s["tpot_p50_s"]},
        "output_tokens": sum(r.output_tokens for r in ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "output_tok_s": s["output_tok_s"],
        "req_s": s["req_s"],
    }
