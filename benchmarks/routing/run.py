"""Routing quality: does picking well make (simulated) inference faster? (docs: benchmarks.md, section A)

    .venv/bin/python -m benchmarks.routing.run --quick      # ~15-20 min: 1 repeat, 75 % (+ shared-prefix's
                                                            # 100 % and 200 %)
    .venv/bin/python -m benchmarks.routing.run              # full: 3 repeats at 50/75/100 % (~2 h)

Arms (arms.py): Envoy round-robin and least-request, the peers vllm-router and sglang-router (cache-aware,
installed into their own venv on first run, see peers.py), epp with configs/epp.yaml (defaults) and
epp-latency (the latency-predicting scorer); any other configs/epp-*.yaml is an arm on request (ablations
epp-prefix-only, epp-load-only, tuning variants). Workloads and fleets: workloads.py.

Method:
1. Calibration (calibrate.py): round-robin's saturation QPS per workload, found on a virtual clock with
   the simulator's own engine; the ladder is placed at fractions of it (LOADS). The 200 % point of
   shared-prefix drives every arm past saturation, so its output tokens/s is each arm's capacity.
2. Runs: for each repeat, workload and load point, every arm back to back (order rotated per repeat and
   point), each on a fresh simulated fleet (cold caches) with the same seed and request sequence; k6
   (benchmarks/k6/routing.js) replays the sequence with Poisson arrivals and measures TTFT, e2e, TPOT and
   tokens; the fleet's /sim/stats gives the prefix-cache hit rate and LoRA loads; CPU time of every process
   and of the machine is recorded (measure.py).
3. Cross-check: two runs (round-robin and epp, shared-prefix, 75 %) are repeated with the Python client
   (epp_lab.loadgen.client, TTFT at the first SSE token) and compared with k6's time to first byte.
4. Results: benchmarks/results/routing.json (header + rows, medians over repeats), routing.runs.json (every
   run), routing.md (tables, ratios vs round-robin, targets), routing.<workload>.png (plots).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import REPO, git, machine_memory_bytes
from benchmarks.routing import arms, calibrate, peers, report
from benchmarks.routing.crosscheck import crosscheck
from benchmarks.routing.measure import K6, run_once
from benchmarks.routing.workloads import (
    PROFILE,
    REPLICAS,
    STREAM_INTERVAL,
    TIME_SCALE,
    WORKLOADS,
)
from epp_lab.envoy_launcher import find_envoy

RESULTS = REPO / "benchmarks" / "results"
LOADS = {  # fractions of round-robin's saturation QPS
    "full": {"shared-prefix": (0.5, 0.75, 1.0, 2.0), "*": (0.5, 0.75, 1.0)},
    "quick": {"shared-prefix": (0.75, 1.0, 2.0), "*": (0.75,)},
}
CROSSCHECKS = (("round-robin", "shared-prefix", 0.75), ("epp", "shared-prefix", 0.75))


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({err})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def header(args: argparse.Namespace, statuses: dict[str, peers.PeerStatus]) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "benchmark": "routing quality (docs/benchmarks.md section A)",
        "command": " ".join([".venv/bin/python -m benchmarks.routing.run", *sys.argv[1:]]),
        "mode": "quick" if args.quick else "full",
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "nproc": os.cpu_count(),
            "memory_gib": round((machine_memory_bytes() or 0) / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {
            "epp": version("epp"),
            "envoy": _version([find_envoy(), "--version"]).split("version:")[-1].strip(),
            "k6": _version([str(K6), "version"]),
            **{name: (s.version or "not installed") for name, s in statuses.items()},
        },
        "peers": {
            name: {"version": s.version, "runs": not s.problem, "problem": s.problem}
            for name, s in statuses.items()
        },
        "fleet": {
            "replicas": REPLICAS,
            "profile": PROFILE,
            "time_scale": args.time_scale,
            "stream_interval": STREAM_INTERVAL,
            "per_workload": {
                n: {
                    "sim": {k: v for k, v in w.sim_options(0, args.time_scale).items() if k != "seed"},
                    "generator": w.generator,
                    "params": w.params,
                    "requests_per_run": w.count,
                }
                for n, w in WORKLOADS.items()
            },
        },
        "seed": args.seed,
        "repeats": args.repeats,
        "git": _git_state(),
        # The scorers each epp arm ran with (configs/<arm>.yaml merged over the defaults of epp/config.py,
        # read at start; every run also records what its picker loaded, in routing.runs.json).
        "epp_configs": {a: arms.epp_scorers(a) for a in args.arms if a.startswith("epp")},
    }


def _git_state() -> dict[str, Any]:
    # The simulator (lab/) shapes the results as much as the picker and Envoy configs do.
    status = git("status", "--porcelain", "--", "epp", "envoy", "lab")
    dirty = [line[3:] for line in status.splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_in_epp_or_envoy": dirty}


def calibrate_all(names: list[str], seed: int, time_scale: float) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        w = WORKLOADS[name]
        t0 = time.perf_counter()
        sim_qps = calibrate.saturation_qps(partial(w.requests, seed=seed), w.fleet)
        out[name] = {
            "rr_saturation_sim_qps": sim_qps,
            "rr_saturation_qps": sim_qps / time_scale,
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"routing: {name}: round-robin saturates at {sim_qps / time_scale:.1f} req/s "
            f"({sim_qps:.2f}/simulated s)",
            file=sys.stderr,
        )
    return out


def _log(run: dict[str, Any], done: int, total: int, started: float) -> None:
    s = run["summary"]
    ttft = s.get("ttft") or {}
    util = ", ".join(f"{k} {v:.2f}" for k, v in run["cpu_util"].items())
    print(
        f"[{done}/{total} {time.perf_counter() - started:5.0f}s] {run['workload']:<13} {run['qps']:6.2f}/s "
        f"{run['arm']:<16} TTFT p90 {ttft.get('p90_s') or float('nan'):6.3f}s  "
        f"{s.get('output_tok_s', 0):7.0f} tok/s  hit {run['fleet']['prefix_hit_rate'] or 0:.2f}  "
        f"loads {run['fleet']['lora_loads']}  err {s.get('errors')}  cpu[{util}] "
        f"machine {run['machine_busy_cores']:.2f}",
        file=sys.stderr,
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    statuses = peers.ensure_venv() if any(a in arms.PEER_ARMS for a in args.arms) else {}
    head = header(args, statuses)
    loads = LOADS["quick" if args.quick else "full"]
    if args.loads:
        loads = {"*": tuple(float(x) for x in args.loads.split(","))}
    calibration = calibrate_all(args.workloads, args.seed, args.time_scale)
    plan = []
    for rep in range(args.repeats):
        for name in args.workloads:
            for i, frac in enumerate(loads.get(name.split("@")[0], loads["*"])):  # a variant: its base's
                qps = round(calibration[name]["rr_saturation_qps"] * frac, 2)
                shift = (rep + i) % len(args.arms)
                for arm in args.arms[shift:] + args.arms[:shift]:
                    plan.append((rep, name, frac, qps, arm))
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    raw_path = args.out.with_suffix(".runs.json")
    done: set[tuple[Any, ...]] = set()
    if args.resume and raw_path.exists():
        runs = json.loads(raw_path.read_text())["runs"]
        done = {(r["repeat"], r["workload"], r["load"], r["arm"]) for r in runs}
        print(f"routing: resuming, {len(done)} of {len(plan)} runs already in {raw_path}", file=sys.stderr)
    for n, (rep, name, frac, qps, arm) in enumerate(plan, 1):
        if arm in skipped or (rep, name, frac, arm) in done:
            continue
        try:
            run = await run_once(
                arm, WORKLOADS[name], qps, args.seed + rep, statuses, time_scale=args.time_scale
            )
        except arms.ArmError as err:
            skipped[arm] = str(err)
            print(f"routing: {arm} cannot run here, skipped: {err}", file=sys.stderr)
            continue
        run.update({"load": frac, "repeat": rep})
        runs.append(run)
        _log(run, n, len(plan), started)
        raw_path.write_text(json.dumps({"header": head, "runs": runs}, indent=1))
    crosschecks = []
    for arm, name, frac in CROSSCHECKS if not args.no_crosscheck else ():
        if arm not in args.arms or name not in args.workloads:
            continue
        qps = round(calibration[name]["rr_saturation_qps"] * frac, 2)
        py = await run_once(
            arm, WORKLOADS[name], qps, args.seed, statuses, python_client=True, time_scale=args.time_scale
        )
        key = (arm, name, frac, 0)
        k6_run = next((r for r in runs if (r["arm"], r["workload"], r["load"], r["repeat"]) == key), None)
        crosschecks.append(crosscheck(k6_run, py))
    head.update(
        {
            "calibration": calibration,
            "skipped_arms": skipped,
            "crosscheck": crosschecks,
            "runtime_s": round(time.perf_counter() - started, 1),
        }
    )
    raw_path.write_text(json.dumps({"header": head, "runs": runs}, indent=1))
    report.write(head, runs, args.out, plots=not args.no_plots)
    print(
        f"routing: done in {time.perf_counter() - started:.0f}s; wrote {args.out}, "
        f"{args.out.with_suffix('.md')}, {raw_path}",
        file=sys.stderr,
    )
    return 0


FLEET_OPTIONS = ("num_gpu_blocks", "max_num_seqs", "max_lora")


def _variant(spec: str, parser: argparse.ArgumentParser) -> Any:
    """Workload `NAME@key=value[+key=value]`: NAME on a fleet with other sizes (keys: FLEET_OPTIONS), e.g.
    `shared-prefix@num_gpu_blocks=400` (a small KV cache, so that evictions matter)."""
    from dataclasses import replace

    name, _, options = spec.partition("@")
    fleet = dict(WORKLOADS[name].fleet)
    for item in options.split("+"):
        key, _, value = item.partition("=")
        if key not in FLEET_OPTIONS or not value.isdigit():
            keys = ", ".join(FLEET_OPTIONS)
            parser.error(f"workload {spec!r}: expected {name}@key=value with key in {keys}")
        fleet[key] = int(value)
    return replace(WORKLOADS[name], name=spec, fleet=fleet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routing.run",
        description="Routing-quality benchmark: arms x workloads x QPS ladder on a simulated vLLM fleet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer load points (< 15 min)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per point (default 1 quick, 3 full)"
    )
    parser.add_argument(
        "--arms",
        default=",".join(arms.ALL_ARMS),
        help="comma-separated arms (any configs/epp-*.yaml is an arm too)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated workloads; NAME@num_gpu_blocks=N (or max_num_seqs, max_lora) runs NAME on "
        "replicas of that size",
    )
    parser.add_argument(
        "--loads",
        default="",
        help="override the ladder: fractions of round-robin's saturation QPS for every workload, e.g. 0.75,2",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=TIME_SCALE,
        help="real seconds per simulated second of the fleet (1 = the profile in real time, 4x longer runs)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "routing.json",
        help="results file; .md, .runs.json and .<workload>.png are written beside it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in the .runs.json beside --out and run only the missing ones "
        "(same arguments as the interrupted run)",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-crosscheck", action="store_true", help="skip the Python-client TTFT run")
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for a in args.arms:
        if not arms.known(a):
            parser.error(
                f"unknown arm {a!r}: expected one of {', '.join(arms.ALL_ARMS)} or configs/epp-*.yaml"
            )
    for w in args.workloads:
        if "@" in w and w.split("@", 1)[0] in WORKLOADS:
            WORKLOADS[w] = _variant(w, parser)
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}: expected one of {', '.join(WORKLOADS)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("\nrouting: interrupted; all processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
