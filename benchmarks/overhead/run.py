"""Picker cost: what does the picker add to a request through Envoy? (docs: benchmarks.md, section B)

Real k6 (`benchmarks/k6/overhead.js`, constant arrival rate, ~1 KB non-streaming chat completion) through
real Envoy to an "instant upstream" (`upstream.py`: one Envoy answering on N ports with `direct_response`).
Arms, each in its own processes, run back to back (and in rotated order over repeats):

    no-extproc    Envoy `direct` shape, ROUND_ROBIN over 64 instant endpoints (no picker at all)
    noop-extproc  Envoy `gateway` (FULL_DUPLEX_STREAMED) / `buffered` shape → `noop_extproc.py`, which sends
                  every request to one fixed endpoint: the floor for any grpc.aio picker
    epp           the same two shapes → `epp serve --plaintext` (default config: full scheduling, 50 ms
                  metrics scrape) over 8, 64 or 256 instant endpoints

Modes `full-duplex` and `buffered` are the shipped shapes; `+resp-none` variants set the ext_proc filter's
response_body_mode to NONE (no-op and epp at 64 endpoints) to show what passing the response body through
the picker costs. Quick mode runs `full-duplex+resp-none` only; full mode both.

Each arm climbs a ladder of constant rates. A step *passes* when errors < 1 %, p99 ≤ the bound (50 ms),
dropped iterations < 1 % and the achieved rate ≥ 90 % of the target. A failed step is retried once (the
machine is shared); after a confirmed failure the gap to the last passing rate is bisected. The highest
passing rate is the arm's sustainable requests/s. Around every step the CPU seconds of the picker, the
front Envoy, the upstream and k6 are read from /proc (and the machine's busy time from /proc/stat), so the
picker's CPU seconds per 1,000 requests and the CPU other tenants took are reported with each step.

    .venv/bin/python -m benchmarks.overhead.run [--quick]      (quick ~5-6 min; full: 3 repeats, ~1 h)

Writes benchmarks/results/overhead.json (header + rows + summary) and overhead.md (tables, targets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/overhead/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    VENV_BIN,
    machine_info,
    markdown_table,
    process_cpu_seconds,
    tool_version,
    write_json,
)
from benchmarks.overhead.upstream import InstantUpstream
from epp.envoy_launcher import Envoy, EnvoyOptions, find_envoy

K6_SCRIPT = REPO / "benchmarks" / "k6" / "overhead.js"
# Request body modes (Envoy shapes `gateway` and `buffered`), and the same with the ext_proc filter's
# response_body_mode set to NONE ("+resp-none": the response body bypasses the picker; only its headers and
# trailers are sent), to show what echoing the response body costs.
MODES = ("full-duplex", "buffered", "full-duplex+resp-none", "buffered+resp-none")
DEFAULT_MODES = {"quick": MODES[:3], "full": MODES}
RESP_NONE = "+resp-none"
SHAPE_OF_MODE = {"full-duplex": "gateway", "buffered": "buffered"}
ENDPOINT_COUNTS = (8, 64, 256)
BASELINE_ENDPOINTS = 64  # pool of the no-extproc arm, and the N at which the targets are evaluated
REFERENCE_RATE = 200  # requests/s at which the p50 target is evaluated (all arms sustain it)
TARGET_RPS_RATIO = 0.85
TARGET_P50_DELTA_MS = 1.0


# -- arms and settings -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Arm:
    name: str  # no-extproc | noop-extproc | epp
    mode: str  # full-duplex | buffered | "-" (no ext_proc)
    endpoints: int  # instant endpoints the arm routes over (noop: 1, a fixed destination)

    @property
    def shape(self) -> str:
        return "direct" if self.name == "no-extproc" else SHAPE_OF_MODE[self.mode.removesuffix(RESP_NONE)]

    @property
    def response_body_none(self) -> bool:
        return self.mode.endswith(RESP_NONE)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.mode}/{self.endpoints}"


def all_arms(names: list[str], modes: list[str], counts: list[int]) -> list[Arm]:
    arms: list[Arm] = []
    if "no-extproc" in names:
        arms.append(Arm("no-extproc", "-", BASELINE_ENDPOINTS))
    for mode in modes:
        if "noop-extproc" in names:
            arms.append(Arm("noop-extproc", mode, 1))
        if "epp" in names:
            # The response-body variant only at the N where the targets are evaluated (if it is run).
            sizes = (
                [n for n in counts if n == BASELINE_ENDPOINTS] or counts[:1] if RESP_NONE in mode else counts
            )
            arms.extend(Arm("epp", mode, n) for n in sizes)
    return arms


async def start_envoy(envoy: Envoy, response_body_none: bool) -> None:
    """Start Envoy; the "+resp-none" modes set the ext_proc filter's response_body_mode to NONE."""
    if response_body_none:
        envoy.options.processing_mode["response_body_mode"] = "NONE"
    await envoy.start()


@dataclass(slots=True)
class Settings:
    quick: bool
    rates: list[int]
    step_s: float
    warmup_s: float
    idle_s: float
    repeats: int
    bisect: int  # bisection steps after a confirmed failure
    p99_bound_ms: float = 50.0
    max_error_rate: float = 0.01
    scrape_interval: float | None = None  # None: the picker's default
    extra_epp_args: list[str] = field(default_factory=list)


QUICK_RATES = [100, 200, 400, 800, 1200, 1600, 2400, 3200, 4800]
FULL_RATES = [100, 200, 300, 400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2400, 3200, 4000, 4800, 6400]


# -- processes ---------------------------------------------------------------------------------------------
class Child:
    """A long-running child process that writes its bound ports to a ready file (picker or no-op)."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.ready_file = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float = 30.0) -> dict[str, int]:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, "--ready-file", str(self.ready_file),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists() or not self.ready_file.read_text().strip():
            if self.process.returncode is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                await self.stop()
                raise RuntimeError(f"{self.name} did not start; its log ends:\n{tail}")
            await asyncio.sleep(0.05)
        self.ports = json.loads(self.ready_file.read_text())
        return self.ports

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.process = None


def picker_argv(arm: Arm, pool: list[str], settings: Settings) -> list[str]:
    if arm.name == "noop-extproc":
        return [
            sys.executable,
            "-m",
            "benchmarks.overhead.noop_extproc",
            "--destination",
            pool[0],
            "--port",
            "0",
        ]
    argv = [
        str(VENV_BIN / "epp"),
        "serve",
        "--plaintext",
        "--extproc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--endpoints",
        ",".join(pool),
        "--seed",
        "1",
        "--log-level",
        "WARNING",
    ]
    if settings.scrape_interval is not None:
        argv += ["--scrape-interval", str(settings.scrape_interval)]
    return argv + settings.extra_epp_args


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time (already counted in user)
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


def children_cpu_seconds() -> float:
    """CPU of reaped children: the delta around one k6 run is that k6's CPU (other children live on)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
        "envoy": run.envoy.process.pid if run.envoy.process else None,
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


async def climb(
    run: Running, settings: Settings, repeat: int, workdir: Path
) -> tuple[list[dict], int | None]:
    """The rate ladder for one arm: returns the step rows and the highest passing rate."""
    rows: list[dict] = []

    async def step(rate: int) -> bool:
        row = await measure_step(run, rate, settings.step_s, settings, workdir)
        row["repeat"] = repeat
        row["idle_picker_cores"] = run.idle_picker_cores
        row["idle_upstream_cores"] = run.idle_upstream_cores
        rows.append(row)
        flag = "ok  " if row["ok"] else "FAIL"
        print(
            f"  {flag} {run.arm.label:34} rate {rate:5d}  got {row['achieved_rps']:7.1f}/s  "
            f"p50 {row['p50_ms']:7.2f}  p99 {row['p99_ms']:8.2f} ms  err {row['errors']:5d}  "
            f"drop {row['dropped']:5d}  picker {row['cpu_s_per_1k']} s/1k  "
            f"others {row['other_tenants_cores']}",
            flush=True,
        )
        return bool(row["ok"])

    async def confirmed(rate: int) -> bool:
        if await step(rate):
            return True
        rows[-1]["superseded"] = True  # a retry follows; the summary uses the last attempt
        return await step(rate)

    passed: int | None = None
    failed: int | None = None
    for rate in settings.rates:
        if await confirmed(rate):
            passed = rate
        else:
            failed = rate
            break
    if passed is not None and failed is not None:
        low, high = passed, failed
        for _ in range(settings.bisect):
            mid = int(round((low + high) / 2 / 50) * 50)
            if mid <= low or mid >= high:
                break
            if await confirmed(mid):
                low = passed = mid
            else:
                high = mid
    return rows, passed


async def run_arm(
    arm: Arm, upstream: InstantUpstream, settings: Settings, repeat: int
) -> tuple[list[dict], dict]:
    pool = upstream.addresses[: arm.endpoints]
    with tempfile.TemporaryDirectory(prefix="epp-overhead-") as tmp:
        workdir = Path(tmp)
        picker: Child | None = None
        envoy: Envoy | None = None
        try:
            options = EnvoyOptions(shape=arm.shape, pool=pool, lb_policy="ROUND_ROBIN")
            if arm.name != "no-extproc":
                picker = Child(arm.name, picker_argv(arm, pool, settings), workdir)
                ports = await picker.start()
                options.epp_port = ports["extproc"]
            envoy = Envoy(options)
            await start_envoy(envoy, arm.response_body_none)
            run = Running(arm, envoy, upstream, picker)
            # Warm up (connections, first scrapes), check the arm works, then the picker's idle CPU.
            warm = await run_k6(envoy.url, 100, settings.warmup_s, arm, settings, workdir)
            if warm["error_rate"] >= 0.5:
                raise RuntimeError(
                    f"{arm.label}: warm-up failed ({warm['errors']} errors of {warm['requests']}); "
                    f"Envoy log:\n{envoy.log_tail()}"
                )
            await measure_idle(run, settings.idle_s)
            rows, passed = await climb(run, settings, repeat, workdir)
            info = {
                "arm": arm.name,
                "mode": arm.mode,
                "endpoints": arm.endpoints,
                "repeat": repeat,
                "sustainable_rate": passed,
                "idle_picker_cores": run.idle_picker_cores,
                "idle_upstream_cores": run.idle_upstream_cores,
                "warmup_error_rate": warm["error_rate"],
            }
            return rows, info
        finally:
            if envoy is not None:
                await envoy.stop()
            if picker is not None:
                await picker.stop()


# -- summary -----------------------------------------------------------------------------------------------
def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    m = statistics.median(present)
    return round(m, 3) if isinstance(m, float) else m


def summarize(rows: list[dict], infos: list[dict]) -> dict[str, Any]:
    """Medians over repeats, per arm and rate (last attempt of each step), and the sustainable rates."""
    final = [r for r in rows if not r.get("superseded")]
    by_step: dict[tuple, list[dict]] = defaultdict(list)
    for r in final:
        by_step[(r["arm"], r["mode"], r["endpoints"], r["rate"])].append(r)
    steps = []
    numeric = (
        "achieved_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "errors",
        "dropped",
        "cpu_s_per_1k",
        "cpu_s_per_1k_net_of_idle",
        "envoy_cpu_s_per_1k",
        "k6_cpu_s_per_1k",
        "other_tenants_cores",
    )
    for (arm, mode, endpoints, rate), group in by_step.items():
        step = {"arm": arm, "mode": mode, "endpoints": endpoints, "rate": rate, "repeats": len(group)}
        for key in numeric:
            step[key] = _median([g[key] for g in group])
        step["ok"] = sum(g["ok"] for g in group) * 2 > len(group)  # passed in most repeats
        statuses: dict[str, int] = defaultdict(int)
        for g in group:
            for status, count in g.get("failed_by_status", {}).items():
                statuses[status] += count
        step["failed_by_status_all_repeats"] = dict(statuses)
        steps.append(step)
    order = {name: i for i, name in enumerate(("no-extproc", "noop-extproc", "epp"))}
    steps.sort(
        key=lambda s: (
            MODES.index(s["mode"]) if s["mode"] in MODES else -1,
            order[s["arm"]],
            s["endpoints"],
            s["rate"],
        )
    )

    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for info in infos:
        by_arm[(info["arm"], info["mode"], info["endpoints"])].append(info)
    sustainable = []
    for (arm, mode, endpoints), group in by_arm.items():
        rates = [g["sustainable_rate"] or 0 for g in group]
        best = _median(rates)
        achieved = [
            s["achieved_rps"]
            for s in steps
            if (s["arm"], s["mode"], s["endpoints"]) == (arm, mode, endpoints) and s["rate"] == best
        ]
        sustainable.append(
            {
                "arm": arm,
                "mode": mode,
                "endpoints": endpoints,
                "sustainable_rate": best,
                "achieved_rps_at_it": achieved[0] if achieved else None,
                "per_repeat": rates,
                "idle_picker_cores": _median([g["idle_picker_cores"] for g in group]),
                "idle_upstream_cores": _median([g["idle_upstream_cores"] for g in group]),
            }
        )
    sustainable.sort(
        key=lambda s: (MODES.index(s["mode"]) if s["mode"] in MODES else -1, order[s["arm"]], s["endpoints"])
    )
    return {"steps": steps, "sustainable": sustainable, "targets": evaluate_targets(steps, sustainable)}


def _step(steps: list[dict], arm: str, mode: str, endpoints: int, rate: int) -> dict | None:
    return next(
        (
            s
            for s in steps
            if (s["arm"], s["mode"], s["endpoints"], s["rate"]) == (arm, mode, endpoints, rate)
        ),
        None,
    )


def evaluate_targets(steps: list[dict], sustainable: list[dict]) -> list[dict]:
    """Per mode: epp at 64 endpoints vs the no-op, in sustainable rps and in p50 at the reference rate."""
    out = []
    rates = {(s["arm"], s["mode"], s["endpoints"]): s["sustainable_rate"] for s in sustainable}
    for mode in MODES:
        noop = rates.get(("noop-extproc", mode, 1))
        evaluated_mode = RESP_NONE not in mode  # the targets are about the shipped Envoy shapes
        for endpoints in sorted(
            {s["endpoints"] for s in sustainable if s["arm"] == "epp" and s["mode"] == mode}
        ):
            epp = rates.get(("epp", mode, endpoints))
            if noop is None or epp is None:
                continue
            ratio = round(epp / noop, 3) if noop else None
            a = _step(steps, "epp", mode, endpoints, REFERENCE_RATE)
            b = _step(steps, "noop-extproc", mode, 1, REFERENCE_RATE)
            delta = None
            if a and b and a["p50_ms"] is not None and b["p50_ms"] is not None:
                delta = round(a["p50_ms"] - b["p50_ms"], 2)
            both_passed = bool(a and b and a["ok"] and b["ok"])
            # p50 deltas at every rate both arms passed, for context.
            common = []
            for s in steps:
                if s["arm"] == "epp" and s["mode"] == mode and s["endpoints"] == endpoints and s["ok"]:
                    other = _step(steps, "noop-extproc", mode, 1, s["rate"])
                    if other and other["ok"]:
                        common.append(
                            {"rate": s["rate"], "p50_delta_ms": round(s["p50_ms"] - other["p50_ms"], 2)}
                        )
            out.append(
                {
                    "mode": mode,
                    "endpoints": endpoints,
                    "evaluated": evaluated_mode and endpoints == BASELINE_ENDPOINTS,
                    "epp_sustainable": epp,
                    "noop_sustainable": noop,
                    "rps_ratio": ratio,
                    "rps_target_met": ratio is not None and ratio >= TARGET_RPS_RATIO,
                    "reference_rate": REFERENCE_RATE,
                    "p50_delta_ms": delta,
                    "p50_target_met": both_passed and delta is not None and delta <= TARGET_P50_DELTA_MS,
                    "reference_steps_passed": both_passed,
                    "p50_delta_by_rate": common,
                }
            )
    return out


def cpu_notes(summary: dict) -> list[str]:
    """Computed from this run's steps (passing ones only, where CPU per request is not inflated by drops)."""
    steps = [s for s in summary["steps"] if s["ok"]]

    def med(values: list[float | None]) -> float | None:
        got = _median(values)
        return None if got is None else round(got, 2)

    out = []
    for mode in MODES:
        noop = {s["rate"]: s for s in steps if s["arm"] == "noop-extproc" and s["mode"] == mode}
        if not noop:
            continue
        floor = med([s["cpu_s_per_1k"] for s in noop.values()])
        envoy = med([s["envoy_cpu_s_per_1k"] for s in noop.values()])
        k6 = med([s["k6_cpu_s_per_1k"] for s in noop.values()])
        text = (
            f"- `{mode}`: the no-op ext_proc uses {floor} CPU s per 1k requests, i.e. {floor} ms of CPU per "
            f"request (the grpc.aio floor); the front Envoy {envoy}, k6 {k6} (medians over passing steps)."
        )
        extra = []
        for n in sorted({s["endpoints"] for s in steps if s["arm"] == "epp" and s["mode"] == mode}):
            diffs = [
                s["cpu_s_per_1k_net_of_idle"] - noop[s["rate"]]["cpu_s_per_1k"]
                for s in steps
                if s["arm"] == "epp" and s["mode"] == mode and s["endpoints"] == n and s["rate"] in noop
                and s["cpu_s_per_1k_net_of_idle"] is not None and noop[s["rate"]]["cpu_s_per_1k"] is not None
            ]  # fmt: skip
            idle = next(
                (x["idle_picker_cores"] for x in summary["sustainable"]
                 if (x["arm"], x["mode"], x["endpoints"]) == ("epp", mode, n)),
                None,
            )  # fmt: skip
            if diffs:
                extra.append(f"{n} endpoints {med(diffs):+g} ms per request, {idle} cores idle")
        if extra:
            text += (
                " epp's CPU over the no-op's at the same rates, net of epp's idle CPU: "
                + "; ".join(extra)
                + " (idle = metrics scraping alone, no traffic)."
            )
        out.append(text)
    return out or ["(no passing no-op steps)"]


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{'transport' if k == '0' else k}: {v}" for k, v in sorted(counts.items()))


def write_markdown(path: Path, header: dict, summary: dict, settings: Settings) -> None:
    busy = header.get("busy_machine_note", "")
    lines = [
        "# Picker cost through Envoy (benchmark B)",
        "",
        f"`{header['command']}` · {header['date_utc']} · nproc {header['nproc']} · "
        f"memory {round((header['machine_memory_bytes'] or 0) / 2**30, 1)} GiB · {header['envoy']} · "
        f"{header['k6']} · Python {header['python']} · {'quick' if settings.quick else 'full'} mode, "
        f"{settings.repeats} repeat(s), {settings.step_s:g} s per step · commit "
        f"{(header.get('git_commit') or '?')[:10]}"
        + (
            f" with uncommitted changes in {', '.join(header['epp_uncommitted_files'])}"
            if header.get("epp_uncommitted_files")
            else ""
        ),
        "",
        "k6 `constant-arrival-rate` POSTs a ~1 KB non-streaming `/v1/chat/completions` to Envoy "
        "(1 worker), which forwards to an instant upstream (Envoy `direct_response` on N ports). "
        f"A step passes with errors < {settings.max_error_rate:.0%}, p99 ≤ {settings.p99_bound_ms:g} ms, "
        "dropped iterations < 1 % and ≥ 90 % of the target rate achieved; *sustainable* = highest "
        "passing rate (ladder, a failed step is retried once, then the gap is bisected). `cpu s/1k` = "
        "the picker process's CPU seconds (utime + stime) per 1,000 requests during the step, including "
        "its background metrics scraping; `net` subtracts the picker's idle CPU rate (scraping only). "
        "`others` = cores used by processes outside the benchmark (other tenants of the machine).",
        "",
    ]
    if busy:
        lines += [f"**{busy}**", ""]
    lines += ["## Sustainable requests/s", ""]
    lines.append(
        markdown_table(
            [
                {
                    "arm": s["arm"],
                    "mode": s["mode"],
                    "endpoints": s["endpoints"],
                    "sustainable rate": s["sustainable_rate"] or f"< {settings.rates[0]}",
                    "achieved rps": s["achieved_rps_at_it"],
                    "per repeat": ", ".join(map(str, s["per_repeat"])),
                    "idle picker cores": s["idle_picker_cores"],
                    "idle upstream cores": s["idle_upstream_cores"],
                }
                for s in summary["sustainable"]
            ]
        )
    )
    lines += ["", "## Targets (picker vs the no-op ext_proc, same mode)", ""]
    lines.append(
        f"Targets: at {BASELINE_ENDPOINTS} endpoints the picker sustains ≥ {TARGET_RPS_RATIO:.0%} of the "
        f"no-op's requests/s, and adds ≤ {TARGET_P50_DELTA_MS:g} ms to p50 at {REFERENCE_RATE} requests/s. "
        "Rows at 8 and 256 endpoints and the `+resp-none` rows (response body not sent to the picker) are "
        "for context; their verdicts are in parentheses."
    )
    lines.append("")

    def verdict(flag: bool, evaluated: bool) -> str:
        text = "met" if flag else "NOT met"
        return text if evaluated else f"({text})"

    lines.append(
        markdown_table(
            [
                {
                    "mode": t["mode"],
                    "endpoints": t["endpoints"],
                    "epp rps": t["epp_sustainable"],
                    "no-op rps": t["noop_sustainable"],
                    "ratio": t["rps_ratio"],
                    "≥ 85 %": verdict(t["rps_target_met"], t["evaluated"]),
                    f"p50 Δ @ {REFERENCE_RATE}/s (ms)": (
                        t["p50_delta_ms"]
                        if t["reference_steps_passed"]
                        else f"{'–' if t['p50_delta_ms'] is None else t['p50_delta_ms']} (step failed)"
                    ),
                    "≤ 1 ms": verdict(t["p50_target_met"], t["evaluated"]),
                    "p50 Δ at other common passing rates (ms)": ", ".join(
                        f"{d['rate']}: {d['p50_delta_ms']:+g}"
                        for d in t["p50_delta_by_rate"]
                        if d["rate"] != REFERENCE_RATE
                    ),
                }
                for t in summary["targets"]
            ]
        )
    )
    lines += ["", "## Where the CPU goes", ""]
    lines += cpu_notes(summary)
    lines += ["", "## Every step (medians over repeats)", ""]
    lines.append(
        markdown_table(
            [
                {
                    "arm": s["arm"],
                    "mode": s["mode"],
                    "endpoints": s["endpoints"],
                    "rate": s["rate"],
                    "achieved rps": s["achieved_rps"],
                    "p50 ms": s["p50_ms"],
                    "p99 ms": s["p99_ms"],
                    "errors": s["errors"]
                    if not s["failed_by_status_all_repeats"]
                    else f"{s['errors']} ({_statuses(s['failed_by_status_all_repeats'])})",
                    "dropped": s["dropped"],
                    "cpu s/1k": s["cpu_s_per_1k"],
                    "net": s["cpu_s_per_1k_net_of_idle"],
                    "envoy s/1k": s["envoy_cpu_s_per_1k"],
                    "k6 s/1k": s["k6_cpu_s_per_1k"],
                    "others": s["other_tenants_cores"],
                    "pass": "yes" if s["ok"] else "no",
                }
                for s in summary["steps"]
            ]
        )
    )
    path.write_text("\n".join(lines) + "\n")


def _git_state() -> dict[str, Any]:
    """The commit measured, and any uncommitted change under epp/ (others may be editing it)."""

    def git(*argv: str) -> str:
        try:
            out = subprocess.run(
                ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "epp").splitlines() if line.strip()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or None, "epp_uncommitted_files": dirty}


def _envoy_version() -> str | None:
    text = tool_version([find_envoy(), "--version"])
    found = re.search(r"/(\d+\.\d+\.\d+)/", text or "")
    return f"envoy {found.group(1)}" if found else text


# -- main --------------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace, settings: Settings) -> None:
    arms = all_arms(args.arms, args.modes, args.endpoints)
    header = machine_info(
        "overhead",
        quick=settings.quick,
        envoy=_envoy_version(),
        k6=tool_version([str(VENV_BIN / "k6"), "version"]),
        settings=asdict(settings),
        arms=[a.label for a in arms],
        k6_script=str(K6_SCRIPT.relative_to(REPO)),
        **_git_state(),
    )
    rows: list[dict] = []
    infos: list[dict] = []
    started = time.monotonic()
    async with InstantUpstream(max(a.endpoints for a in arms)) as upstream:
        upstream.verify()
        print(f"instant upstream: {upstream.count} endpoints on 127.0.0.1 (Envoy pid {upstream.pid})")
        for repeat in range(settings.repeats):
            shift = repeat % len(arms)
            order = arms[shift:] + arms[:shift]  # rotate so no arm always runs first or last
            for arm in order:
                print(f"[repeat {repeat + 1}/{settings.repeats}] {arm.label}", flush=True)
                arm_rows, info = await run_arm(arm, upstream, settings, repeat)
                rows += arm_rows
                infos.append(info)
                print(
                    f"  → sustainable {info['sustainable_rate']} req/s; "
                    f"idle picker {info['idle_picker_cores']} cores"
                )
    header["elapsed_s"] = round(time.monotonic() - started, 1)
    others = [r["other_tenants_cores"] for r in rows]
    header["other_tenants_cores_median"] = _median(others)
    header["other_tenants_cores_max"] = max(others) if others else None
    if others and (_median(others) or 0) >= 0.1:
        header["busy_machine_note"] = (
            f"Taken on a busy shared machine: other tenants used a median {_median(others)} and up to "
            f"{max(others)} of the {os.cpu_count()} cores during the steps; absolute numbers are noisy, "
            "compare arms (run back to back) rather than absolutes."
        )
    summary = summarize(rows, infos)
    out_json = args.out_dir / "overhead.json"
    write_json(out_json, {"header": header, "rows": rows, "arms": infos, "summary": summary})
    write_markdown(args.out_dir / "overhead.md", header, summary, settings)
    print(f"wrote {out_json} and {args.out_dir / 'overhead.md'} ({header['elapsed_s']} s)")
    for t in summary["targets"]:
        if t["evaluated"]:
            print(
                f"  {t['mode']}: epp/no-op rps {t['rps_ratio']} (target ≥ {TARGET_RPS_RATIO}); "
                f"p50 Δ {t['p50_delta_ms']} ms at {REFERENCE_RATE}/s (target ≤ {TARGET_P50_DELTA_MS})"
            )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 s steps, coarse ladder (~5 min)")
    parser.add_argument("--repeats", type=int, help="repeats of the whole arm sequence (default 3; quick 1)")
    parser.add_argument("--step-seconds", type=float, help="duration of each rate step (default 10; quick 4)")
    parser.add_argument("--rates", help="comma-separated rate ladder (requests/s)")
    parser.add_argument("--p99-bound-ms", type=float, default=50.0, help="p99 bound of a passing step (50)")
    parser.add_argument("--arms", default="no-extproc,noop-extproc,epp", help="arms to run (comma-separated)")
    parser.add_argument(
        "--modes",
        help=f"ext_proc modes (comma-separated) of {', '.join(MODES)} (default: all; quick: the first three)",
    )
    parser.add_argument("--endpoints", default=",".join(map(str, ENDPOINT_COUNTS)), help="epp pool sizes")
    parser.add_argument("--scrape-interval", type=float, help="picker metrics scrape interval (its default)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where overhead.json/.md go")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="only rewrite overhead.md from the rows in --out-dir's overhead.json",
    )
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.modes = (
        [m for m in args.modes.split(",") if m]
        if args.modes
        else list(DEFAULT_MODES["quick" if args.quick else "full"])
    )
    args.endpoints = [int(n) for n in args.endpoints.split(",") if n]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; expected {', '.join(MODES)}")
    quick = args.quick
    settings = Settings(
        quick=quick,
        rates=[int(r) for r in args.rates.split(",")]
        if args.rates
        else (QUICK_RATES if quick else FULL_RATES),
        step_s=args.step_seconds or (3.0 if quick else 10.0),
        warmup_s=2.0 if quick else 5.0,
        idle_s=2.0 if quick else 5.0,
        repeats=args.repeats or (1 if quick else 3),
        bisect=1 if quick else 2,
        p99_bound_ms=args.p99_bound_ms,
        scrape_interval=args.scrape_interval,
    )
    return args, settings


def rerender(out_dir: Path) -> None:
    """Rewrite overhead.md (and the summary) from the rows of an existing overhead.json."""
    path = out_dir / "overhead.json"
    data = json.loads(path.read_text())
    settings = Settings(**data["header"]["settings"])
    data["summary"] = summarize(data["rows"], data["arms"])
    write_json(path, data)
    write_markdown(out_dir / "overhead.md", data["header"], data["summary"], settings)
    print(f"rewrote {out_dir / 'overhead.md'} from {path}")


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    if args.rerender:
        rerender(args.out_dir)
        return
    try:
        asyncio.run(main_async(args, settings))
    except KeyboardInterrupt:  # every process was stopped by the finally blocks on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
