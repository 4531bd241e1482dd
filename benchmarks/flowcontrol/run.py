"""Flow control under overload: does holding requests in the picker keep critical traffic fast, serve tenants
fairly and lose no throughput? (README: "Flow control")

    .venv/bin/python -m benchmarks.flowcontrol.run --quick    # ~8 min: 1 repeat, 40 s of arrivals per run
    .venv/bin/python -m benchmarks.flowcontrol.run            # 3 repeats, 60 s per run (~30 min)
    .venv/bin/python -m benchmarks.flowcontrol.report benchmarks/results/flowcontrol.json   # re-render

Method (workload and fleet: workload.py):
1. The fleet's saturation rate for the mixed workload is found on a virtual clock (round-robin keeps up).
2. For each repeat and load point (50 %, 150 %, 200 % of it), the same request sequence (seed = repeat) runs
   through both arms back to back, each on a fresh fleet: `fc-off` (the picker without flow control:
   sheddable requests get 429 while saturated, all others go to a model server at once) and `fc-on` (flow
   control with its defaults); the order alternates between points and repeats. configs/ holds both.
3. The light tenant's own requests of the 150 % and 200 % sequences run alone (fc-on), for its fairness
   baseline.
4. k6 (mixed.js) replays each sequence (Poisson arrivals, one VU per request) and records every request:
   TTFT (time to first byte: the simulator sends headers with the first token), status, drop reason,
   output tokens. measure.py aggregates by class and tenant; the picker's own outcome counts and every
   process's CPU are recorded. Results: benchmarks/results/flowcontrol.json (every run, medians, targets)
   and flowcontrol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS_DIR, git, machine_info, tool_version, write_json
from benchmarks.flowcontrol import report, workload
from benchmarks.flowcontrol.measure import K6, run_once
from epp_lab.envoy_launcher import find_envoy

ARMS = ("fc-off", "fc-on")
LOADS = (0.5, 1.5, 2.0)
ALONE_LOADS = (1.5, 2.0)


def _log(run: dict[str, Any], done: int, total: int, started: float) -> None:
    s = run["summary"]

    def p90(group: str) -> float:
        return s.get(group, {}).get("ttft_p90_s") or float("nan")

    shed = s.get("sheddable", {})
    print(
        f"[{done}/{total} {time.perf_counter() - started:4.0f}s] {run['label']:<18} {run['arm']:<7} "
        f"TTFT p90 critical {p90('critical'):.3f}s standard {p90('standard'):.3f}s "
        f"light {p90('light/served'):.3f}s"
        f"  sheddable ok/429/503 {shed.get('ok', 0)}/{shed.get('http_429', 0)}/{shed.get('http_503', 0)}"
        f"  {s.get('throughput', {}).get('output_tok_s', 0):.0f} tok/s  unexplained "
        f"{s['all']['unexplained_errors']}  machine {run['machine_busy_cores']:.2f} cores",
        file=sys.stderr,
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    saturation = workload.saturation_qps(args.seed)
    print(f"flowcontrol: the fleet saturates at {saturation:.2f} req/s", file=sys.stderr)
    plan: list[tuple[str, str, float, int, list[workload.Mixed]]] = []
    for rep in range(args.repeats):
        seed = args.seed + rep
        for n, load in enumerate(args.loads):
            qps = saturation * load
            sequence = workload.mixed(qps, max(1, round(qps * args.duration)), seed)
            shift = (rep + n) % len(ARMS)
            for arm in ARMS[shift:] + ARMS[:shift]:
                plan.append((f"{load:.0%}", arm, load, rep, sequence))
            if load in ALONE_LOADS:
                light = [m for m in sequence if m.tenant == "light"]
                plan.append((f"{load:.0%} light alone", "fc-on", load, rep, light))
    runs: list[dict[str, Any]] = []
    head = machine_info(
        "flow control (README: Flow control)",
        mode="quick" if args.quick else "full",
        machine_memory_gib=None,
        versions={"envoy": (tool_version([find_envoy(), "--version"]) or "").split("version:")[-1].strip(),
                  "k6": tool_version([str(K6), "version"])},
        git={"commit": git("rev-parse", "--short", "HEAD").strip(),
             "uncommitted": [line[3:] for line in git("status", "--porcelain", "--", "epp").splitlines()]},
        fleet={"replicas": workload.REPLICAS, **workload.sim_options(args.seed)},
        workload={"classes": workload.CLASSES, "tenants": workload.TENANTS, "objectives": workload.OBJECTIVES,
                  "prompt_tokens": "uniform 500-2000", "output_tokens": workload.OUTPUT_TOKENS,
                  "arrival_seconds_per_run": args.duration},
        saturation_qps=saturation,
        loads=list(args.loads),
        repeats=args.repeats,
        seed=args.seed,
    )  # fmt: skip
    memory = head.pop("machine_memory_bytes", None)
    head["machine_memory_gib"] = round((memory or 0) / 2**30, 1)
    for n, (label, arm, load, rep, sequence) in enumerate(plan, 1):
        run = await run_once(arm, sequence, args.seed + rep)
        run.update({"label": label, "load": load, "repeat": rep, "alone": "alone" in label})
        runs.append(run)
        _log(run, n, len(plan), started)
        write_json(args.out.with_suffix(".partial.json"), {"header": head, "runs": runs})
    head["runtime_s"] = round(time.perf_counter() - started, 1)
    report.write(head, runs, args.out)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    md = args.out.with_suffix(".md")
    print(f"flowcontrol: done in {head['runtime_s']:.0f}s; wrote {args.out} and {md}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.flowcontrol.run",
        description="Flow control under overload: fc-on vs fc-off on a simulated fleet, through real Envoy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 40 s of arrivals per run (~8 min)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 1 with --quick, else 3")
    parser.add_argument("--duration", type=float, default=None, help="seconds of arrivals per run")
    parser.add_argument(
        "--loads", default=",".join(f"{x:g}" for x in LOADS), help="fractions of the saturation rate"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "flowcontrol.json")
    args = parser.parse_args(argv)
    args.loads = tuple(float(x) for x in args.loads.split(",") if x)
    if 0.5 not in args.loads:
        parser.error("--loads must include 0.5 (the critical-latency baseline)")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 40.0 if args.quick else 60.0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("\nflowcontrol: interrupted; all processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
