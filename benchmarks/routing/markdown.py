"""routing.md: the routing benchmark's report, from the header, the aggregated rows and the targets."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.routing.aggregate import BASELINE, find, get, median, ratio
from epp_lab.tables import table_lines


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def markdown(
    head: dict[str, Any], rows: list[dict[str, Any]], goals: list[dict[str, Any]], stem: str = "routing"
) -> str:
    m = head["machine"]
    fleet = head["fleet"]
    title = "Routing quality" + (": tuning the picker's scorer weights" if "rounds" in head else "")
    lines = [
        f"# {title}: epp vs Envoy round-robin / least-request and peer routers",
        "",
        (
            "Config tuning: the commands of the rounds are listed below"
            if "rounds" in head
            else f"Command: `{head['command']}` ({head['mode']} mode, {head['repeats']} repeat(s), medians "
            "over repeats)"
        )
        + f"; {head['date_utc']}; machine: {m['nproc']} cores, {m['memory_gib']} GiB, shared with "
        f"other tenants (noisy: see the CPU section); runtime {head.get('runtime_s', 0) / 60:.1f} min.",
        "",
        *(
            [f"Tuning rounds ({head['note']}):"]
            + [
                f"- round {i}: `{r['command']}` ({r['date_utc']}, {r['runs']} runs)"
                for i, r in enumerate(head["rounds"], 1)
            ]
            + [""]
            if "rounds" in head
            else []
        ),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in head["versions"].items()) + ".",
        "",
        f"Fleet: {fleet['replicas']} simulated vLLM replicas (`epp sim`, profile `{fleet['profile']}`) at "
        f"time scale {fleet['time_scale']} (the simulated GPUs run {1 / fleet['time_scale']:g}x faster than "
        f"the profile, so every latency below is real seconds = simulated seconds x {fleet['time_scale']}; "
        f"ratios are unaffected), SSE tokens grouped by {fleet['stream_interval']}; a fresh fleet (cold "
        "caches) for every run; the same seed and request sequence for every arm. Load generator: k6 "
        "(`benchmarks/k6/routing.js`), Poisson arrivals replayed from the workload generator; TTFT = k6's "
        "time to first byte (the simulator sends headers with the first token).",
        "",
        "Picker configs (epp arms: `benchmarks/routing/configs/<arm>.yaml` over the defaults in "
        "`epp/config.py`): "
        + "; ".join(f"**{a}**: " + ", ".join(sc) for a, sc in (head.get("epp_configs") or {}).items())
        + f". Code: commit {get(head, 'git', 'commit') or '?'}"
        + (
            f" with uncommitted changes in {', '.join(head['git']['uncommitted_in_epp_or_envoy'])}"
            if get(head, "git", "uncommitted_in_epp_or_envoy")
            else ""
        )
        + ".",
        "",
        "## Targets",
        "",
    ]
    lines += table_lines(
        ["arm", "target", "status", "numbers"],
        [[g["arm"], g["target"], f"**{g['status']}**", g["detail"]] for g in goals],
    )
    lines += [
        "",
        "## Results per workload",
        "",
        "Load = offered QPS as a fraction of round-robin's saturation QPS (calibrated on the simulator's "
        "engine, see Method). Ratios are vs round-robin at the same point (TTFT: lower is better; tok/s: "
        "higher is better).",
        "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        cal = head.get("calibration", {}).get(workload, {})
        lines += [
            f"### {workload}",
            "",
            f"Round-robin saturation: {cal.get('rr_saturation_qps', float('nan')):.1f} req/s. "
            f"Fleet: {json.dumps(fleet['per_workload'][workload]['sim'])}; workload: "
            f"{json.dumps(fleet['per_workload'][workload]['params'])}, "
            f"{fleet['per_workload'][workload]['requests_per_run']} requests per run.",
            "",
        ]
        lora = workload == "multi-lora"
        columns = ["load", "QPS", "arm", "TTFT p50", "TTFT p90", "TTFT p99", "e2e p50", "e2e p99", "TPOT p50",
                   "out tok/s", "req/s", "hit rate", *(["LoRA loads"] if lora else []), "errors (429)",
                   "TTFT p90 vs RR", "tok/s vs RR", "runs"]  # fmt: skip
        table: list[list[str]] = []
        for r in [r for r in rows if r["workload"] == workload]:
            base = find(rows, workload, BASELINE, r["load"]) or {}
            cells = [f"{r['load']:.0%}", f"{r['qps']:.1f}", r["arm"]]
            cells += [_f(r[k]) for k in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s")]
            cells += [
                _f(r["tpot_p50_s"], 4),
                _f(r["output_tok_s"], 0),
                _f(r["req_s"], 1),
                _f(r["hit_rate"], 2),
            ]
            cells += [_f(r.get("lora_loads"))] if lora else []
            cells += [f"{_f(r['errors'])} ({_f(r['rejected_429'])})"]
            cells += [_x(ratio(r["ttft_p90_s"], base.get("ttft_p90_s")))]
            cells += [_x(ratio(r["output_tok_s"], base.get("output_tok_s"))), str(r["repeats"])]
            table.append(cells)
        lines += table_lines(columns, table)
        lines.append("")
        lines.append(f"![{workload}]({stem}.{workload}.png)")
        lines.append("")
    if stem == "routing":
        lines += [
            "Config variants tried on these workloads, and the defaults they support: "
            "[routing.tuning.md](routing.tuning.md) and `benchmarks/README.md`.",
            "",
        ]
    lines += _cpu_section(rows)
    lines += _crosscheck_section(head.get("crosscheck"))
    lines += _calibration_section(head, rows)
    lines += ["## Peers", ""]
    for name, p in head["peers"].items():
        lines.append(
            f"- {name} {p['version'] or ''}: "
            + (
                "ran, unmodified, `--policy cache_aware`, defaults otherwise"
                if p["runs"]
                else f"did not run: {p['problem']}"
            )
        )
    for arm, why in (head.get("skipped_arms") or {}).items():
        lines.append(f"- {arm} was skipped: {why}")
    lines.append("")
    return "\n".join(lines)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else float("nan")


def _cpu_section(rows: list[dict[str, Any]]) -> list[str]:
    def peak(key: str) -> tuple[float, str]:
        best = (0.0, "")
        for r in rows:
            v = r.get(key)
            if isinstance(v, int | float) and v > best[0]:
                best = (v, f"{r['workload']} {r['load']:.0%} {r['arm']}")
        return best

    sim, k6 = peak("cpu_sim"), peak("cpu_k6")
    lag = peak("schedule_lag_p99_s")
    busy = [r["machine_busy_cores"] for r in rows if r.get("machine_busy_cores") is not None]
    other = [r["other_tenants_cores"] for r in rows if r.get("other_tenants_cores") is not None]
    routers = [
        (k, peak(k))
        for k in sorted({k for r in rows for k in r if k.startswith("cpu_")} - {"cpu_sim", "cpu_k6"})
    ]
    lines = [
        "## Is the simulator or k6 the bottleneck?",
        "",
        f"- Simulator process: at most {sim[0]:.2f} of a core ({sim[1]}); k6: at most {k6[0]:.2f} of a core "
        f"({k6[1]}). Neither comes near one core, so neither limits the runs.",
        f"- k6 kept the Poisson schedule: the worst p99 lateness of a send vs its arrival time was "
        f"{lag[0] * 1000:.1f} ms ({lag[1]}).",
        "- Routers (peak share of a core): "
        + ", ".join(f"{k[4:]} {v[0]:.2f} ({v[1]})" for k, v in routers)
        + ".",
        f"- The machine (2 cores) was busy {_num(median(busy)):.2f} cores (median over runs), of "
        f"which other tenants {_num(median(other)):.2f}: "
        "absolute latencies carry that noise; arms ran back to back at every point to share it.",
        "",
    ]
    return lines


def _crosscheck_section(checks: Any) -> list[str]:
    checks = [
        c for c in (checks if isinstance(checks, list) else [checks]) if c and "k6_http_req_waiting" in c
    ]
    if not checks:
        return []
    lines = [
        "## TTFT cross-check: k6 vs the Python streaming client",
        "",
        "Per check: the same arm, workload, QPS, seed and request sequence replayed twice on fresh fleets, "
        "once by k6 (TTFT = time to first byte) and once by the Python client "
        "(`lab/epp_lab/loadgen/client.py`, TTFT = arrival of the first SSE token); each next to the "
        "simulator's own mean TTFT of that run (server side, x time scale). Round-robin places requests "
        "independently of timing, so its two runs differ only in measurement; epp's placement depends on "
        "timing, so its two runs may also differ in routing.",
        "",
    ]
    table: list[list[Any]] = []
    for c in checks:
        for label, key in (("k6", "k6_http_req_waiting"), ("python", "python_client")):
            d = c[key]
            table.append(
                [c["arm"], c["workload"], c["qps"], label, _f(d.get("avg_s")), _f(d.get("p50_s")),
                 _f(d.get("p90_s")), _f(d.get("p99_s")), _f(d.get("server_ttft_mean_s")),
                 _f(d.get("hit_rate"), 2)]
            )  # fmt: skip
        r = c["ratio_k6_over_python"]
        table.append(
            [c["arm"], "", "", "k6 / python", _x(r.get("avg_s")), _x(r.get("p50_s")), _x(r.get("p90_s")),
             _x(r.get("p99_s")), "", ""]
        )  # fmt: skip
    columns = ["arm", "workload", "QPS", "client", "TTFT mean", "p50", "p90", "p99", "server-side mean",
               "hit rate"]  # fmt: skip
    lines += table_lines(columns, table)
    lines.append("")
    return lines


def _calibration_section(head: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Method notes",
        "",
        "- Saturation QPS (round-robin's) is found before the runs by replaying the workload on a virtual "
        "clock through the simulator's own engine (`benchmarks/routing/calibrate.py`): the highest offered "
        "rate at which round-robin completes the run's sequence at >= 90 % of that rate (first arrival to "
        "last completion); beyond it the queues grow for the whole run. Measured round-robin req/s:",
        "",
    ]
    for workload, cal in head.get("calibration", {}).items():
        over = [r for r in rows if r["workload"] == workload and r["arm"] == BASELINE and r["load"] >= 1.0]
        seen = (
            ", ".join(f"{r['load']:.0%}: {r['req_s']:.1f} req/s" for r in over)
            or "no point >= 100 % in this run"
        )
        lines.append(
            f"  - {workload}: calibrated {cal['rr_saturation_qps']:.1f} req/s; measured round-robin {seen}"
        )
    lines += [
        "- Output tok/s and req/s are totals over the run's wall time (first arrival to last completion), so "
        "below saturation they follow the offered load; at 200 % every arm is saturated and they measure "
        "capacity.",
        "- Arrivals: k6 `shared-iterations` with one VU per request; iteration i sleeps until its Poisson "
        "offset, then sends request i (open model: no response delays a later arrival).",
        "",
    ]
    return lines
