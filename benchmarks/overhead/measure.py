"""One measurement of the overhead benchmark: a k6 step at a constant rate, and every process's CPU time.

Around every step the CPU seconds of the picker, the front Envoy and the upstream are read from /proc, k6's
from `getrusage(RUSAGE_CHILDREN)` (the only child reaped meanwhile) and the machine's busy time from
/proc/stat, so each step reports the picker's CPU seconds per 1,000 requests and the cores other tenants of
the machine took. `measure_idle` reads the picker's and the upstream's CPU while no requests flow.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    VENV_BIN,
    children_cpu_seconds,
    machine_busy_seconds,
    process_cpu_seconds,
)
from benchmarks.overhead.arms import Arm, Settings
from benchmarks.overhead.upstream import InstantUpstream
from epp_lab.envoy_launcher import Envoy
from epp_lab.procs import Child

K6_SCRIPT = REPO / "benchmarks" / "k6" / "overhead.js"


async def run_k6(target: str, rate: int, seconds: float, arm: Arm, settings: Settings, workdir: Path) -> dict:
    summary_path = workdir / "k6-summary.json"
    summary_path.unlink(missing_ok=True)
    vus = max(20, math.ceil(rate * 0.06))  # enough for the rate at ~60 ms per request without spawning
    env = {**os.environ, "K6_NO_USAGE_REPORT": "true"}
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "k6"), "run", "--quiet", "--no-usage-report", "--no-color",
        "-e", f"TARGET={target}", "-e", f"RATE={rate}", "-e", f"DURATION={seconds:g}s",
        "-e", f"VUS={vus}", "-e", f"MAX_VUS={2 * vus}", "-e", f"P99_BOUND_MS={settings.p99_bound_ms:g}",
        "-e", f"SUMMARY={summary_path}", "-e", f"ARM={arm.name}", "-e", f"MODE={arm.mode}",
        "-e", f"ENDPOINTS={arm.endpoints}", str(K6_SCRIPT),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Exit code 99 = thresholds crossed: an expected outcome of a step, judged by the caller.
    if process.returncode not in (0, 99) or not summary_path.exists():
        raise RuntimeError(
            f"k6 failed (exit {process.returncode}):\n{stderr.decode(errors='replace')[-3000:]}"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


@dataclass(slots=True)
class Running:
    """The processes of one arm while it is measured."""

    arm: Arm
    envoy: Envoy
    upstream: InstantUpstream
    picker: Child | None
    idle_picker_cores: float | None = None  # picker CPU while no requests flow (metrics scraping etc.)
    idle_upstream_cores: float | None = None  # the instant upstream answering those scrapes


async def measure_step(run: Running, rate: int, seconds: float, settings: Settings, workdir: Path) -> dict:
    pids = {
        "picker": run.picker.pid if run.picker else None,
        "envoy": run.envoy.pid,
        "upstream": run.upstream.pid,
    }
    before = {k: process_cpu_seconds(p) if p else None for k, p in pids.items()}
    k6_before = children_cpu_seconds()
    busy0, _ = machine_busy_seconds()
    wall0 = time.monotonic()
    load1 = os.getloadavg()[0]
    summary = await run_k6(run.envoy.url, rate, seconds, run.arm, settings, workdir)
    wall = time.monotonic() - wall0
    busy1, _ = machine_busy_seconds()
    k6_cpu = children_cpu_seconds() - k6_before
    cpu = {}
    for key, pid in pids.items():
        after = process_cpu_seconds(pid) if pid else None
        start = before[key]
        cpu[key] = None if after is None or start is None else after - start
    requests = int(summary["requests"]) or 1
    per_1k = {k: None if v is None else round(v / requests * 1000, 3) for k, v in cpu.items()}
    ours = sum(v for v in cpu.values() if v is not None) + k6_cpu
    machine_cores = (busy1 - busy0) / wall
    errors = int(summary["errors"])
    dropped = int(summary["dropped_iterations"])
    p99 = summary["p99_ms"]
    achieved = float(summary["achieved_rps"])
    ok = (
        summary["error_rate"] < settings.max_error_rate
        and p99 is not None
        and p99 <= settings.p99_bound_ms
        and dropped < max(1, rate * seconds * 0.01)
        and achieved >= 0.9 * rate
    )
    net = None
    if cpu["picker"] is not None and run.idle_picker_cores is not None:
        net = round(max(0.0, cpu["picker"] - run.idle_picker_cores * wall) / requests * 1000, 3)
    return {
        "arm": run.arm.name,
        "mode": run.arm.mode,
        "endpoints": run.arm.endpoints,
        "rate": rate,
        "achieved_rps": round(achieved, 1),
        "p50_ms": _r(summary["p50_ms"]),
        "p90_ms": _r(summary["p90_ms"]),
        "p99_ms": _r(p99),
        "max_ms": _r(summary["max_ms"]),
        "errors": errors,
        "error_rate": round(float(summary["error_rate"]), 4),
        "failed_by_status": summary.get("failed_by_status", {}),
        "dropped": dropped,
        "requests": int(summary["requests"]),
        "cpu_s_per_1k": per_1k["picker"],
        "cpu_s_per_1k_net_of_idle": net,
        "envoy_cpu_s_per_1k": per_1k["envoy"],
        "upstream_cpu_s_per_1k": per_1k["upstream"],
        "k6_cpu_s_per_1k": round(k6_cpu / requests * 1000, 3),
        "picker_cores": None if cpu["picker"] is None else round(cpu["picker"] / wall, 2),
        "machine_busy_cores": round(machine_cores, 2),
        "other_tenants_cores": round(max(0.0, machine_cores - ours / wall), 2),
        "load1_before": round(load1, 2),
        "ok": ok,
    }


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


async def measure_idle(run: Running, seconds: float) -> None:
    """CPU of the picker and of the upstream while no requests flow: the cost of metrics scraping."""
    pids = [run.picker.pid if run.picker else None, run.upstream.pid]
    start = [process_cpu_seconds(p) if p else None for p in pids]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    wall = time.monotonic() - t0
    end = [process_cpu_seconds(p) if p else None for p in pids]
    cores = [
        None if a is None or b is None else round((b - a) / wall, 3) for a, b in zip(start, end, strict=True)
    ]
    run.idle_picker_cores, run.idle_upstream_cores = cores
