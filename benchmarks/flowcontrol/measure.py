"""One measured run: a fresh simulated fleet, the picker (one of `configs/*.yaml`) behind real Envoy, the k6
replay of one mixed sequence (mixed.js), then per-request samples aggregated by class and tenant, the
fleet's counters, the picker's flow-control outcomes and every process's CPU time."""

from __future__ import annotations

import asyncio
import csv
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import REPO, VENV_BIN, children_cpu_seconds, machine_busy_seconds
from benchmarks.flowcontrol.workload import REPLICAS, Mixed, sim_options, write_requests
from benchmarks.routing.measure import fleet_totals, process_cpu_s
from epp_lab import procs
from epp_lab.envoy_launcher import Envoy, EnvoyOptions
from epp_lab.loadgen.client import percentile

K6_SCRIPT = REPO / "benchmarks" / "flowcontrol" / "mixed.js"
K6 = VENV_BIN / "k6"
CONFIGS = REPO / "benchmarks" / "flowcontrol" / "configs"
DROPS = (429, 503)


def config_path(arm: str) -> Path:
    return CONFIGS / f"{arm}.yaml"


async def run_k6(url: str, requests_file: Path, workdir: Path) -> tuple[list[dict[str, Any]], dict, float]:
    """Replay with k6; returns (one sample per request, k6's summary, k6's CPU seconds)."""
    samples_file, summary_file = workdir / "samples.csv", workdir / "summary.json"
    before = children_cpu_seconds()
    process = await asyncio.create_subprocess_exec(
        str(K6), "run", "--quiet", "--no-color", "--no-usage-report", "--out", f"csv={samples_file}",
        "-e", f"TARGET={url}", "-e", f"REQUESTS={requests_file}", "-e", f"SUMMARY={summary_file}",
        str(K6_SCRIPT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(workdir),
    )  # fmt: skip
    _, err = await process.communicate()
    k6_cpu = children_cpu_seconds() - before
    if not summary_file.exists():
        raise RuntimeError(f"k6 wrote no summary (exit {process.returncode}): {err.decode()[-1500:]}")
    import json

    samples = []
    with samples_file.open() as f:
        for row in csv.DictReader(f):
            if row["metric_name"] != "fc_request":
                continue
            tags = dict(parse_qsl(row["extra_tags"], keep_blank_values=True))
            samples.append(
                {"i": int(tags["i"]), "cls": tags["cls"], "tenant": tags["tenant"], "code": int(tags["code"]),
                 "reason": tags["reason"], "out": int(tags["out"]), "e2e_ms": float(tags["e2e"]),
                 "sent_ms": float(tags["sent"]), "value_ms": float(row["metric_value"])}
            )  # fmt: skip
    return sorted(samples, key=lambda s: s["i"]), json.loads(summary_file.read_text()), k6_cpu


def group_stats(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts by outcome and latency percentiles (seconds) of one group of requests."""
    ok = [s for s in samples if s["code"] == 200 and s["out"] > 0]
    ttft = [s["value_ms"] / 1000 for s in ok]
    e2e = [s["e2e_ms"] / 1000 for s in ok]
    dropped = [s for s in samples if s["code"] in DROPS and s["reason"]]
    return {
        "requests": len(samples),
        "ok": len(ok),
        "http_429": sum(1 for s in samples if s["code"] == 429),
        "http_503": sum(1 for s in samples if s["code"] == 503),
        # Anything that is neither a success nor a drop that says why (429/503 with the reason header).
        "unexplained_errors": len(samples) - len(ok) - len(dropped),
        "reasons": dict(Counter(s["reason"] for s in dropped)),
        "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
        "ttft_p90_s": percentile(ttft, 0.9) if ttft else None,
        "ttft_p99_s": percentile(ttft, 0.99) if ttft else None,
        "e2e_p50_s": percentile(e2e, 0.5) if e2e else None,
        "e2e_p99_s": percentile(e2e, 0.99) if e2e else None,
    }


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per class, per tenant, per class x tenant; the light tenant's served latency; fleet throughput."""
    out: dict[str, Any] = {"all": group_stats(samples)}
    for key in ("cls", "tenant"):
        for value in sorted({s[key] for s in samples}):
            out[value] = group_stats([s for s in samples if s[key] == value])
    for s in sorted({(s["cls"], s["tenant"]) for s in samples}):
        out[f"{s[0]}/{s[1]}"] = group_stats([x for x in samples if (x["cls"], x["tenant"]) == s])
    # A tenant's latency: its critical and standard requests (sheddable ones are shed under overload).
    for tenant in sorted({s["tenant"] for s in samples}):
        served = [s for s in samples if s["tenant"] == tenant and s["cls"] != "sheddable"]
        out[f"{tenant}/served"] = group_stats(served)
    ok = [s for s in samples if s["code"] == 200 and s["out"] > 0]
    # Every request that did not succeed, compactly (diagnosis: which status, which reason, which class).
    failures: Counter[str] = Counter()
    for s in samples:
        if not (s["code"] == 200 and s["out"] > 0):
            what = f"{s['code']} {s['reason']}" if s["code"] != 200 else "200 without a usage chunk"
            failures[f"{s['cls']}/{s['tenant']}: {what.strip()}"] += 1
    out["failures"] = dict(sorted(failures.items()))
    if ok:
        start = min(s["sent_ms"] for s in samples)
        end = max(s["sent_ms"] + s["e2e_ms"] for s in ok)
        window = max(1e-9, (end - start) / 1000)
        out["throughput"] = {
            "window_s": window,
            "output_tokens": sum(s["out"] for s in ok),
            "output_tok_s": sum(s["out"] for s in ok) / window,
            "ok_req_s": len(ok) / window,
        }
    return out


async def picker_outcomes(metrics_port: int) -> dict[str, float]:
    """Flow-control outcomes counted by the picker (its queue-duration histogram's count by outcome)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    outcomes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "inference_extension_flow_control_request_queue_duration_seconds_count":
                outcomes[s.labels["outcome"]] += s.value
    return dict(outcomes)


async def run_once(arm: str, requests: Sequence[Mixed], seed: int) -> dict[str, Any]:
    """One arm over `requests` on a fresh fleet."""
    with tempfile.TemporaryDirectory(prefix="flowcontrol-") as tmp:
        workdir = Path(tmp)
        requests_file = workdir / "requests.json"
        write_requests(requests_file, requests)
        async with procs.sim(REPLICAS, **sim_options(seed)) as fleet:
            workers = fleet.info["addresses"]
            extra = ["--seed", str(seed), "--admin-port", "0"]
            async with procs.picker(workers, config=config_path(arm), extra=extra) as picker:
                options = EnvoyOptions(shape="gateway", epp_port=picker.info["extproc"], pool=workers)
                async with Envoy(options) as envoy:
                    assert fleet.pid and picker.pid and envoy.pid
                    pids = {"sim": fleet.pid, "picker": picker.pid, "envoy": envoy.pid}
                    cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items()}
                    busy0, t0 = machine_busy_seconds()[0], time.perf_counter()
                    samples, k6_summary, k6_cpu = await run_k6(envoy.url, requests_file, workdir)
                    wall = time.perf_counter() - t0
                    busy = machine_busy_seconds()[0] - busy0
                    cpu = {name: process_cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
                    outcomes = await picker_outcomes(picker.info["metrics"])
                    totals = await fleet_totals(workers[0], 1.0)
    cpu["k6"] = k6_cpu
    return {
        "arm": arm,
        "seed": seed,
        "requests": len(requests),
        "summary": summarize(samples),
        "picker_outcomes": outcomes,
        "k6": k6_summary,
        "fleet": {k: totals.get(k) for k in ("completed", "generated_tokens", "preemptions", "aborted")},
        "wall_s": wall,
        "cpu_util": {k: v / wall for k, v in cpu.items()},
        "machine_busy_cores": busy / wall if wall else 0.0,
    }
