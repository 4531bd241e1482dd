"""The shared-prefix routing case driven by upstream's own benchmark tool, inference-perf.

    ./benchmarks/inference_perf/setup                          # once: inference-perf's venv (Python 3.12+)
    .venv/bin/python -m benchmarks.inference_perf.run --quick  # 2 loads x 1 repeat (~6 min)
    .venv/bin/python -m benchmarks.inference_perf.run          # 3 loads x 3 repeats (~22 min)

The Gateway API Inference Extension project benchmarks endpoint pickers with inference-perf (PyPI
`inference-perf`) and its shared-prefix data generator. This runner puts that tool in place of k6 in the
routing benchmark's shared-prefix case (benchmarks/routing), and changes nothing else:

* Fleet and arms: for every run a fresh simulated fleet (`epp_lab.procs.sim`, 4 replicas, the
  shared-prefix workload's options from benchmarks/routing/workloads.py: profile, time scale, SSE grouping,
  1,200 KV blocks) and a fresh arm from `benchmarks.routing.arms.start` (Envoy round-robin /
  least-request, the peer routers vllm-router and sglang-router from the routing benchmark's peers venv,
  and epp behind real Envoy with ext_proc).
* Load: inference-perf 0.7.0 from its own venv (benchmarks/inference_perf/.venv, pinned by
  requirements.txt; it needs Python >= 3.12), run as a subprocess against the arm's HTTP address:
  `data.type: shared_prefix` with num_groups 16, system_prompt_len 3000, question_len 150, output_len 128
  (the shared-prefix workload's groups, system_tokens, question_tokens, output_tokens); Poisson arrivals
  (`load.type: poisson`) for the workload's 400 requests per run; streaming (`api.streaming: true`) on
  /v1/completions, which is what the generator emits for text prompts. The workload's "8 users" only label
  questions (every request has a question of its own), so num_prompts_per_group is set to 400 / 16 = 25:
  400 distinct prompts, none repeated within a run, as in the workload.
* Rates: fractions of round-robin's saturation QPS (75 %, 100 %, 200 %; quick: 75 %, 200 %), calibrated on
  the simulator's engine by `benchmarks.routing.calibrate` exactly as the routing benchmark does.
* Tokenizer: inference-perf needs one and this machine is offline; tokenizer.py builds a word-level one
  at run time in a temp dir (3-letter words, so N tokens decode to 4N - 1 characters: N tokens for the
  simulator too; see its docstring). HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 are set.
* Measured: inference-perf's own summary report (summary_lifecycle_metrics.json): TTFT (first streamed
  token), request latency, output tokens/s and requests/s over its benchmark window, request and error
  counts, and the cached share of the prompt tokens the fleet reported in `usage`. Beside it, the fleet's
  /sim/stats prefix-hit rate (`benchmarks.routing.measure.fleet_totals`), inference-perf's CPU time, the
  machine's busy cores and the load average (the machine is shared).

Results: benchmarks/results/inference_perf.json (header, medians per load x arm, every run) and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    children_cpu_seconds,
    git,
    load_average,
    machine_busy_seconds,
    machine_info,
    tool_version,
    write_json,
)
from benchmarks.inference_perf import report
from benchmarks.routing import arms, calibrate, peers
from benchmarks.routing.measure import fleet_totals
from benchmarks.routing.workloads import REPLICAS, TIME_SCALE, WORKLOADS
from epp_lab import procs
from epp_lab.envoy_launcher import find_envoy

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
INFERENCE_PERF = VENV / "bin" / "inference-perf"
SETUP = HERE / "setup"
REQUIREMENTS = HERE / "requirements.txt"
TOKENIZER_BUILDER = HERE / "tokenizer.py"
SETUP_COMMAND = "./benchmarks/inference_perf/setup"

WORKLOAD = WORKLOADS["shared-prefix"]
DEFAULT_ARMS = ("round-robin", "least-request", "vllm-router", "sglang-router", "epp")
LOADS = {"full": (0.75, 1.0, 2.0), "quick": (0.75, 2.0)}
RUN_TIMEOUT_S = 600.0
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "COLUMNS": "160",  # inference-perf's closing tables (kept in its log) without truncated headers
}


class SetupError(RuntimeError):
    """inference-perf's venv is missing or does not match requirements.txt."""


# ---- inference-perf's venv and tokenizer ------------------------------------------------------------


def pinned_version() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.lower().startswith("inference-perf=="):
            return line.split("==", 1)[1].strip()
    raise SetupError(f"{REQUIREMENTS} pins no inference-perf version")


def installed_version() -> str | None:
    if not VENV_PYTHON.exists():
        return None
    out = subprocess.run(
        [str(VENV_PYTHON), "-c", "import importlib.metadata as m; print(m.version('inference-perf'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.stdout.strip() or None


def check_venv() -> str:
    """The installed inference-perf version; SetupError (with the command that fixes it) otherwise."""
    pin = pinned_version()
    version = installed_version()
    if version is None or not INFERENCE_PERF.exists():
        raise SetupError(
            f"inference-perf is not installed: its venv {os.path.relpath(VENV, REPO)} is missing or "
            "incomplete.\n"
            f"Create it (Python >= 3.12, inference-perf=={pin} and its pinned dependencies, ~2 min) with:\n\n"
            f"    {SETUP_COMMAND}\n"
        )
    if version != pin:
        raise SetupError(
            f"{os.path.relpath(VENV, REPO)} has inference-perf {version}, requirements.txt pins {pin}; "
            f"refresh it with:\n\n    {SETUP_COMMAND}\n"
        )
    return version


def run_setup() -> None:
    subprocess.run([str(SETUP)], check=True)


def build_tokenizer(out: Path) -> None:
    done = subprocess.run(
        [str(VENV_PYTHON), str(TOKENIZER_BUILDER), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"building the tokenizer failed: {(done.stderr or done.stdout)[-1500:]}")


# ---- one run --------------------------------------------------------------------------------------------


def inference_perf_config(url: str, qps: float, seed: int, tokenizer: Path, reports: Path) -> dict[str, Any]:
    """inference-perf's config for one run: the shared-prefix workload's shape at `qps` against `url`."""
    params = WORKLOAD.params
    groups = int(params["groups"])
    duration = max(1, round(WORKLOAD.count / qps))
    return {
        "api": {"type": "completion", "streaming": True},
        "data": {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": groups,
                "num_prompts_per_group": math.ceil(WORKLOAD.count / groups),
                "system_prompt_len": int(params["system_tokens"]),
                "question_len": int(params["question_tokens"]),
                "output_len": int(params["output_tokens"]),
                "seed": seed,
            },
        },
        "load": {
            "type": "poisson",
            "stages": [{"rate": qps, "duration": duration}],
            "num_workers": 1,
            # Open loop: never let the client's concurrency cap hold requests back (at 200 % of
            # round-robin's capacity a few hundred requests are in flight).
            "worker_max_concurrency": 2000,
            "request_timeout": 120,
            "base_seed": seed,
        },
        "server": {"type": "vllm", "model_name": str(params["model"]), "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer)},
        "report": {
            "request_lifecycle": {
                "summary": True,
                "per_stage": True,
                "per_request": False,
                # The fleet reports exactly the tokens it generated; no re-tokenizing of the output.
                "use_server_output_tokens": True,
            },
            "prometheus": {"summary": False, "per_stage": False},
        },
        "storage": {"local_storage": {"path": str(reports)}},
    }


async def run_inference_perf(config: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], float, float]:
    """Run inference-perf on `config`; returns (its summary report, its CPU seconds, wall seconds)."""
    config_path = workdir / "config.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "inference-perf.log"
    reports = Path(config["storage"]["local_storage"]["path"])
    before, t0 = children_cpu_seconds(), time.perf_counter()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(INFERENCE_PERF),
            "--config_file",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(workdir),
            env={**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
        )
        try:
            await asyncio.wait_for(process.wait(), RUN_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(f"inference-perf did not finish in {RUN_TIMEOUT_S:.0f}s") from None
    wall, cpu = time.perf_counter() - t0, children_cpu_seconds() - before
    summary = reports / "summary_lifecycle_metrics.json"
    if process.returncode != 0 or not summary.exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"inference-perf exited {process.returncode} without a summary report:\n{tail}")
    return json.loads(summary.read_text()), cpu, wall


def _q(dist: dict[str, Any] | None, key: str) -> float | None:
    return None if not dist else dist.get(key)


def extract(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers this benchmark reports, from inference-perf's summary_lifecycle_metrics.json."""
    ok = summary["successes"]
    latency = ok.get("latency") or {}
    ttft, e2e, tpot = (
        latency.get("time_to_first_token"),
        latency.get("request_latency"),
        latency.get("time_per_output_token"),
    )
    prompt = ok.get("prompt_tokens") or {}
    failures = summary.get("failures") or {}
    throughput = ok.get("throughput") or {}
    return {
        "sent": summary["load_summary"]["count"],
        "ok": ok["count"],
        "errors": failures.get("count", 0),
        "error_labels": {k: v["count"] for k, v in (failures.get("by_label") or {}).items()},
        "ttft_mean_s": _q(ttft, "mean"),
        "ttft_p50_s": _q(ttft, "median"),
        "ttft_p90_s": _q(ttft, "p90"),
        "ttft_p99_s": _q(ttft, "p99"),
        "e2e_p50_s": _q(e2e, "median"),
        "e2e_p99_s": _q(e2e, "p99"),
        "tpot_p50_s": _q(tpot, "median"),
        "output_tok_s": throughput.get("output_tokens_per_sec"),
        "input_tok_s": throughput.get("input_tokens_per_sec"),
        "req_s": throughput.get("requests_per_sec"),
        "benchmark_time_s": summary.get("benchmark_time_seconds"),
        "prompt_tokens": prompt.get("total"),
        "cached_prompt_tokens": prompt.get("cached"),
        "cached_share": (prompt["cached"] / prompt["total"]) if prompt.get("total") else None,
        "schedule_delay_p99_s": _q(summary["load_summary"].get("schedule_delay"), "p99"),
        "output_tokens_mean": _q(ok.get("output_tokens"), "mean"),
        "prompt_tokens_mean": prompt.get("mean"),
    }


async def run_once(
    arm: str, load: float, qps: float, seed: int, statuses: dict[str, peers.PeerStatus], tokenizer: Path
) -> dict[str, Any]:
    """One arm at one rate on a fresh fleet, measured by inference-perf."""
    sim_options = dict(WORKLOAD.sim_options(seed))
    # The options an arm needs from the fleet (KV events for a precise-prefix config), as measure.py does.
    arm_sim_options = getattr(arms, "sim_options", None)
    if arm_sim_options is not None:
        sim_options.update(arm_sim_options(arm))
    load_avg = load_average()
    with tempfile.TemporaryDirectory(prefix="inference-perf-") as tmp:
        workdir = Path(tmp)
        async with procs.sim(REPLICAS, **sim_options) as fleet:
            workers = fleet.info["addresses"]
            async with arms.start(arm, workers, seed, statuses) as running:
                config = inference_perf_config(running.url, qps, seed, tokenizer, workdir / "reports")
                busy0, t0 = machine_busy_seconds()[0], time.perf_counter()
                summary, ip_cpu, ip_wall = await run_inference_perf(config, workdir)
                wall = time.perf_counter() - t0
                busy = machine_busy_seconds()[0] - busy0
                totals = await fleet_totals(workers[0], TIME_SCALE)
    stage = config["load"]["stages"][0]
    return {
        "arm": arm,
        "load": load,
        "qps": qps,
        "seed": seed,
        "planned_requests": int(stage["rate"] * stage["duration"]),
        "stage_duration_s": stage["duration"],
        "metrics": extract(summary),
        "fleet": {
            k: totals.get(k)
            for k in ("prompt_tokens", "cached_tokens", "prefix_hit_rate", "completed", "server_ttft_mean_s")
        },
        "inference_perf_wall_s": ip_wall,
        "inference_perf_cpu_s": ip_cpu,
        "machine_busy_cores": busy / wall if wall else 0.0,
        "load_average_at_start": load_avg,
    }


# ---- the whole benchmark --------------------------------------------------------------------------------


def rr_saturation_qps(seed: int) -> float:
    """Round-robin's saturation QPS of the shared-prefix workload (real seconds), as the routing benchmark
    calibrates it."""
    sim_qps = calibrate.saturation_qps(partial(WORKLOAD.requests, seed=seed), WORKLOAD.fleet)
    return sim_qps / TIME_SCALE


def header(args: argparse.Namespace, version: str, statuses: dict[str, peers.PeerStatus]) -> dict[str, Any]:
    from importlib.metadata import version as dist_version

    status = git("status", "--porcelain", "--", "epp", "envoy", "lab", "benchmarks/routing")
    return machine_info(
        "shared-prefix routing measured with inference-perf",
        command=" ".join([".venv/bin/python -m benchmarks.inference_perf.run", *sys.argv[1:]]),
        mode="quick" if args.quick else "full",
        uname=" ".join(platform.uname()),
        git={
            "commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line[3:] for line in status.splitlines() if line],
        },
        versions={
            "inference-perf": version,
            "epp": dist_version("epp"),
            "envoy": (tool_version([find_envoy(), "--version"]) or "?").split("version:")[-1].strip(),
            **{name: (s.version or "not installed") for name, s in statuses.items()},
        },
        peers={n: {"version": s.version, "problem": s.problem} for n, s in statuses.items()},
        fleet={
            "replicas": REPLICAS,
            **{k: v for k, v in WORKLOAD.sim_options(args.seed).items() if k != "seed"},
        },
        workload={"name": WORKLOAD.name, "params": WORKLOAD.params, "requests_per_run": WORKLOAD.count},
        inference_perf_config_template=inference_perf_config(
            "http://ARM", 1.0, args.seed, Path("TOKENIZER"), Path("REPORTS")
        ),
        repeats=args.repeats,
        seed=args.seed,
        arms=args.arms,
        loads=args.loads,
        epp_configs={a: arms.epp_scorers(a) for a in args.arms if a.startswith("epp")},
    )


def _log(run: dict[str, Any], n: int, total: int, started: float) -> None:
    m = run["metrics"]
    print(
        f"[{n}/{total} {time.perf_counter() - started:5.0f}s] {run['load']:.0%} {run['qps']:6.2f}/s "
        f"{run['arm']:<14} TTFT p50 {m['ttft_p50_s'] or float('nan'):6.3f}s p90 "
        f"{m['ttft_p90_s'] or float('nan'):6.3f}s  {m['output_tok_s'] or 0:6.0f} tok/s  "
        f"ok {m['ok']}/{m['sent']} err {m['errors']}  cached {m['cached_share'] or 0:.2f}  "
        f"inference-perf {run['inference_perf_cpu_s'] / max(run['inference_perf_wall_s'], 1e-9):.2f} cores  "
        f"machine {run['machine_busy_cores']:.2f}  load {run['load_average_at_start']}",
        file=sys.stderr,
        flush=True,
    )


async def main_async(args: argparse.Namespace, version: str) -> int:
    started = time.perf_counter()
    statuses = peers.ensure_venv() if any(a in arms.PEER_ARMS for a in args.arms) else {}
    head = header(args, version, statuses)
    rr_qps = rr_saturation_qps(args.seed)
    print(f"inference-perf: round-robin saturates at {rr_qps:.1f} req/s", file=sys.stderr)
    plan = []
    for rep in range(args.repeats):
        for i, frac in enumerate(args.loads):
            shift = (rep + i) % len(args.arms)
            for arm in args.arms[shift:] + args.arms[:shift]:
                plan.append((rep, frac, round(rr_qps * frac, 2), arm))
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="inference-perf-tokenizer-") as tok:
        tokenizer = Path(tok)
        build_tokenizer(tokenizer)
        for n, (rep, frac, qps, arm) in enumerate(plan, 1):
            if arm in skipped:
                continue
            try:
                run = await run_once(arm, frac, qps, args.seed + rep, statuses, tokenizer)
            except arms.ArmError as err:
                skipped[arm] = str(err)
                print(f"inference-perf: {arm} cannot run here, skipped: {err}", file=sys.stderr)
                continue
            except (RuntimeError, procs.ProcessError) as err:
                failed.append({"arm": arm, "load": frac, "repeat": rep, "error": str(err)[-2000:]})
                print(f"inference-perf: {arm} at {frac:.0%} failed: {err}", file=sys.stderr)
                continue
            run["repeat"] = rep
            runs.append(run)
            _log(run, n, len(plan), started)
    head.update(
        {
            "rr_saturation_qps": rr_qps,
            "skipped_arms": skipped,
            "failed_runs": failed,
            "load_average_at_end": load_average(),
            "runtime_s": round(time.perf_counter() - started, 1),
        }
    )
    rows = report.aggregate(runs)
    write_json(args.out, {"header": head, "rows": rows, "runs": runs})
    args.out.with_suffix(".md").write_text(report.markdown(head, rows, runs))
    print(
        f"inference-perf: done in {time.perf_counter() - started:.0f}s; wrote {args.out} and "
        f"{args.out.with_suffix('.md')}",
        file=sys.stderr,
    )
    return 0 if runs and not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference_perf.run",
        description="The shared-prefix routing case measured with upstream's inference-perf.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="loads 75%%,200%%, 1 repeat (~6 min)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per point (default 1 quick, 3 full)"
    )
    parser.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help="comma-separated arms (benchmarks/routing)"
    )
    parser.add_argument(
        "--loads",
        default="",
        help="fractions of round-robin's saturation QPS (default 0.75,1,2; quick 0.75,2)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / "inference_perf.json",
        help="results file; the .md is written beside it",
    )
    parser.add_argument("--setup", action="store_true", help=f"run {SETUP_COMMAND} first")
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    for a in args.arms:
        if not arms.known(a):
            parser.error(f"unknown arm {a!r}: expected one of {', '.join(arms.ALL_ARMS)}")
    args.loads = (
        [float(x) for x in args.loads.split(",") if x]
        if args.loads
        else list(LOADS["quick" if args.quick else "full"])
    )
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.setup:
        run_setup()
    try:
        version = check_venv()
    except SetupError as err:
        print(f"inference-perf: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main_async(args, version))
    except SetupError as err:
        print(f"inference-perf: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninference-perf: interrupted; all processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
