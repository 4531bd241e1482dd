"""Aggregate the runs (medians over repeats), evaluate the targets, write routing.json, .md and plots."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.routing.arms import ALL_ARMS, PEER_ARMS

BASELINE = "round-robin"
COLORS = ("#7f7f7f", "#bcbd22", "#9467bd", "#8c564b", "#1f77b4", "#2ca02c", "#ff7f0e")  # by ALL_ARMS
EXTRA_COLORS = ("#d62728", "#17becf", "#e377c2", "#000000", "#ff9896", "#aec7e8", "#98df8a", "#c49c94")
ROW_KEYS = (
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "tpot_p50_s",
    "output_tok_s",
    "req_s",
    "errors",
    "rejected_429",
    "hit_rate",
    "lora_loads",
    "client_hit_rate",
    "schedule_lag_p99_s",
    "machine_busy_cores",
    "other_tenants_cores",
)


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def flatten(run: dict[str, Any]) -> dict[str, Any]:
    """One run as a flat row of the reported metrics."""
    s = run["summary"]
    prompt = s.get("prompt_tokens") or 0
    row = {
        "ttft_p50_s": _get(s, "ttft", "p50_s"),
        "ttft_p90_s": _get(s, "ttft", "p90_s"),
        "ttft_p99_s": _get(s, "ttft", "p99_s"),
        "ttft_mean_s": _get(s, "ttft", "avg_s"),
        "server_ttft_mean_s": run["fleet"].get("server_ttft_mean_s"),
        "e2e_p50_s": _get(s, "e2e", "p50_s"),
        "e2e_p99_s": _get(s, "e2e", "p99_s"),
        "tpot_p50_s": _get(s, "tpot", "p50_s"),
        "output_tok_s": s.get("output_tok_s"),
        "req_s": s.get("req_s"),
        "errors": s.get("errors"),
        "rejected_429": s.get("rejected_429"),
        "hit_rate": run["fleet"].get("prefix_hit_rate"),
        "lora_loads": run["fleet"].get("lora_loads"),
        "client_hit_rate": (s.get("cached_tokens") or 0) / prompt if prompt else None,
        "schedule_lag_p99_s": _get(s, "schedule_lag", "p99_s"),
        "machine_busy_cores": run.get("machine_busy_cores"),
        "other_tenants_cores": run.get("other_tenants_cores"),
    }
    for name, util in run.get("cpu_util", {}).items():
        row[f"cpu_{name}"] = util
    return row


def _median(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))]
    if not nums:
        return None
    m = statistics.median(nums)
    return int(m) if all(isinstance(v, int) for v in nums) and m == int(m) else m


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run.get("client", "k6") == "k6":
            groups[(run["workload"], run["arm"], run["load"])].append(run)
    rows = []
    for (workload, arm, load), group in groups.items():
        flats = [flatten(r) for r in group]
        keys = sorted({k for f in flats for k in f}, key=lambda k: (k not in ROW_KEYS, k))
        row: dict[str, Any] = {
            "arm": arm,
            "workload": workload,
            "load": load,
            "qps": _median([r["qps"] for r in group]),
        }
        row.update({k: _median([f.get(k) for f in flats]) for k in keys})
        if workload != "multi-lora":
            row.pop("lora_loads", None)
        row["repeats"] = len(group)
        rows.append(row)
    order = {"shared-prefix": 0, "multi-turn": 1, "multi-lora": 2, "no-sharing": 3}
    arm_order = {a: i for i, a in enumerate(ALL_ARMS)}
    rows.sort(key=lambda r: (order.get(r["workload"], 9), r["load"], arm_order.get(r["arm"], 99), r["arm"]))
    return rows


def _find(rows: list[dict[str, Any]], workload: str, arm: str, load: float) -> dict[str, Any] | None:
    return next((r for r in rows if (r["workload"], r["arm"], r["load"]) == (workload, arm, load)), None)


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b


def candidates(rows: list[dict[str, Any]]) -> list[str]:
    """The arms the targets are evaluated for: `epp` (defaults) and any tuning candidate `epp-tuned*`."""
    present = dict.fromkeys(r["arm"] for r in rows)
    return [a for a in present if a == "epp" or a.startswith("epp-tuned")]


def targets(
    rows: list[dict[str, Any]], ours: str = "epp", rivals_exclude: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The four targets of docs/benchmarks.md for arm `ours` (other candidates in `rivals_exclude` are not
    counted as rivals)."""
    out: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, detail: str, **numbers: Any) -> None:
        out.append(
            {
                "arm": ours,
                "target": name,
                "status": "NOT RUN" if met is None else ("MET" if met else "NOT MET"),
                "detail": detail,
                **numbers,
            }
        )

    # 1. shared-prefix at ~75 %: TTFT p90 <= 0.5 x round-robin and <= 0.9 x the best peer.
    epp, rr = _find(rows, "shared-prefix", ours, 0.75), _find(rows, "shared-prefix", BASELINE, 0.75)
    peers = [r for a in PEER_ARMS if (r := _find(rows, "shared-prefix", a, 0.75))]
    if epp and rr:
        vs_rr = _ratio(epp["ttft_p90_s"], rr["ttft_p90_s"])
        best = min(peers, key=lambda r: r["ttft_p90_s"]) if peers else None
        vs_peer = _ratio(epp["ttft_p90_s"], best["ttft_p90_s"]) if best else None
        ok = vs_rr is not None and vs_rr <= 0.5 and (vs_peer is None or vs_peer <= 0.9)
        peer_text = (
            f"best peer {best['arm']} {best['ttft_p90_s']:.3f}s -> {vs_peer:.2f}x (target <= 0.9)"
            if best and vs_peer is not None
            else "no peer ran"
        )
        add(
            "shared-prefix @75%: TTFT p90 <= 0.5x round-robin and <= 0.9x best peer",
            ok,
            f"{ours} {epp['ttft_p90_s']:.3f}s, round-robin {rr['ttft_p90_s']:.3f}s -> {vs_rr:.2f}x "
            f"(target <= 0.5); {peer_text}",
            epp_vs_rr=vs_rr,
            epp_vs_best_peer=vs_peer,
            best_peer=best["arm"] if best else None,
        )
    else:
        add(
            "shared-prefix @75%: TTFT p90 <= 0.5x round-robin and <= 0.9x best peer",
            None,
            "not measured",
        )

    # 2. shared-prefix at saturation: output tok/s >= 1.5 x round-robin. Measured where every arm is
    # saturated (200 %: each arm's capacity); the 100 % point is shown too (bounded by the offered load).
    sat = {
        load: (_find(rows, "shared-prefix", ours, load), _find(rows, "shared-prefix", BASELINE, load))
        for load in (1.0, 2.0)
    }
    e2, r2 = sat[2.0]
    e1, r1 = sat[1.0]
    at100 = (
        (
            f"; at 100 % (offered load = round-robin's capacity, so no arm can exceed ~1x): "
            f"{ours} {e1['output_tok_s']:.0f} vs {r1['output_tok_s']:.0f} tok/s = "
            f"{_ratio(e1['output_tok_s'], r1['output_tok_s']):.2f}x"
        )
        if e1 and r1
        else ""
    )
    if e2 and r2:
        ratio = _ratio(e2["output_tok_s"], r2["output_tok_s"])
        add(
            "shared-prefix at saturation: output tok/s >= 1.5x round-robin",
            ratio is not None and ratio >= 1.5,
            f"at 200 % of round-robin's saturation QPS (every arm saturated: capacity): "
            f"{ours} {e2['output_tok_s']:.0f} vs round-robin {r2['output_tok_s']:.0f} tok/s = {ratio:.2f}x"
            + at100,
            ratio_at_capacity=ratio,
            ratio_at_100=_ratio(e1["output_tok_s"], r1["output_tok_s"]) if e1 and r1 else None,
        )
    else:
        add(
            "shared-prefix at saturation: output tok/s >= 1.5x round-robin",
            None,
            "not measured" + at100,
        )

    # 3. no-sharing: TTFT p90 within 5 % of least-request's (not worse than 1.05x), at every point.
    pairs = [
        (r["load"], r, _find(rows, "no-sharing", "least-request", r["load"]))
        for r in rows
        if r["workload"] == "no-sharing" and r["arm"] == ours
    ]
    found = [(load, e, lr) for load, e, lr in pairs if lr is not None]
    if found:
        ratios = {load: _ratio(e["ttft_p90_s"], lr["ttft_p90_s"]) for load, e, lr in found}
        ok = all(v is not None and v <= 1.05 for v in ratios.values())
        add(
            "no-sharing: TTFT p90 within 5% of least-request",
            ok,
            "; ".join(
                f"{load:.0%}: {e['ttft_p90_s']:.3f}s vs least-request {lr['ttft_p90_s']:.3f}s = "
                f"{ratios[load]:.2f}x"
                for load, e, lr in found
            ),
            ratios=ratios,
        )
    else:
        add("no-sharing: TTFT p90 within 5% of least-request", None, "not measured")

    # 4. multi-lora: fewer adapter loads and lower TTFT p90 than every other arm, at every point.
    loads = sorted({r["load"] for r in rows if r["workload"] == "multi-lora"})
    details, ok_all = [], bool(loads)
    for load in loads:
        group = [r for r in rows if r["workload"] == "multi-lora" and r["load"] == load]
        e = next((r for r in group if r["arm"] == ours), None)
        others = [r for r in group if r["arm"] != ours and r["arm"] not in rivals_exclude]
        if not e or not others:
            continue
        fewer = all((e.get("lora_loads") or 0) < (o.get("lora_loads") or 0) for o in others)
        faster = all(e["ttft_p90_s"] < o["ttft_p90_s"] for o in others)
        ok_all &= fewer and faster
        best_l = min(others, key=lambda o: o.get("lora_loads") or 0)
        best_t = min(others, key=lambda o: o["ttft_p90_s"])
        details.append(
            f"{load:.0%}: {ours} {e.get('lora_loads')} loads / TTFT p90 {e['ttft_p90_s']:.3f}s; fewest "
            f"other {best_l['arm']} {best_l.get('lora_loads')} loads, fastest other {best_t['arm']} "
            f"{best_t['ttft_p90_s']:.3f}s"
        )
    add(
        "multi-lora: fewer adapter loads and lower TTFT p90 than every other arm",
        ok_all if details else None,
        "; ".join(details) or "not measured",
    )
    return out


def crosscheck(k6_run: dict[str, Any] | None, py_run: dict[str, Any]) -> dict[str, Any]:
    """k6's time to first byte vs the Python client's time to the first SSE token (same arm, sequence and
    seed, two fresh fleets), each next to the simulator's own mean TTFT of that run."""

    def side(run: dict[str, Any], trend: str) -> dict[str, Any]:
        t = run["summary"].get(trend) or {}
        return {
            **{k: t.get(k) for k in ("avg_s", "p50_s", "p90_s", "p99_s")},
            "server_ttft_mean_s": run["fleet"].get("server_ttft_mean_s"),
            "hit_rate": run["fleet"].get("prefix_hit_rate"),
            "output_tok_s": run["summary"].get("output_tok_s"),
        }

    out: dict[str, Any] = {"arm": py_run["arm"], "workload": py_run["workload"], "qps": py_run["qps"],
                           "python_client": side(py_run, "ttft")}  # fmt: skip
    if k6_run:
        out["k6_http_req_waiting"] = side(k6_run, "http_req_waiting")
        out["ratio_k6_over_python"] = {
            k: _ratio(out["k6_http_req_waiting"][k], out["python_client"][k])
            for k in ("avg_s", "p50_s", "p90_s", "p99_s")
        }
    return out


# ---- output --------------------------------------------------------------------------------------------


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
        "Picker configs (epp arms: `benchmarks/routing/configs/<arm>.yaml` over `epp/default_config.yaml`): "
        + "; ".join(f"**{a}**: " + ", ".join(sc) for a, sc in (head.get("epp_configs") or {}).items())
        + f". Code: commit {_get(head, 'git', 'commit') or '?'}"
        + (
            f" with uncommitted changes in {', '.join(head['git']['uncommitted_in_epp_or_envoy'])}"
            if _get(head, "git", "uncommitted_in_epp_or_envoy")
            else ""
        )
        + ".",
        "",
        "## Targets",
        "",
        "| arm | target | status | numbers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {g['arm']} | {g['target']} | **{g['status']}** | {g['detail']} |" for g in goals]
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
        lines.append(
            "| load | QPS | arm | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p99 | TPOT p50 | out tok/s "
            "| req/s | hit rate | " + ("LoRA loads | " if lora else "") + "errors (429) | TTFT p90 vs RR "
            "| tok/s vs RR | runs |"
        )
        lines.append("|" + "---|" * (16 if lora else 15))
        for r in [r for r in rows if r["workload"] == workload]:
            base = _find(rows, workload, BASELINE, r["load"]) or {}
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
            cells += [_x(_ratio(r["ttft_p90_s"], base.get("ttft_p90_s")))]
            cells += [_x(_ratio(r["output_tok_s"], base.get("output_tok_s"))), str(r["repeats"])]
            lines.append("| " + " | ".join(cells) + " |")
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
        f"- The machine (2 cores) was busy {_num(_median(busy)):.2f} cores (median over runs), of "
        f"which other tenants {_num(_median(other)):.2f}: "
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
        "once "
        "by k6 (TTFT = time to first byte) and once by the Python client (`epp/loadgen/client.py`, TTFT = "
        "arrival of the first SSE token); each next to the simulator's own mean TTFT of that run (server "
        "side, x time scale). Round-robin places requests independently of timing, so its two runs differ "
        "only in measurement; epp's placement depends on timing, so its two runs may also differ in routing.",
        "",
        "| arm | workload | QPS | client | TTFT mean | p50 | p90 | p99 | server-side mean | hit rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        for label, key in (("k6", "k6_http_req_waiting"), ("python", "python_client")):
            d = c[key]
            lines.append(
                f"| {c['arm']} | {c['workload']} | {c['qps']} | {label} | {_f(d.get('avg_s'))} | "
                f"{_f(d.get('p50_s'))} | {_f(d.get('p90_s'))} | {_f(d.get('p99_s'))} | "
                f"{_f(d.get('server_ttft_mean_s'))} | {_f(d.get('hit_rate'), 2)} |"
            )
        r = c["ratio_k6_over_python"]
        lines.append(
            f"| {c['arm']} | | | k6 / python | {_x(r.get('avg_s'))} | {_x(r.get('p50_s'))} | "
            f"{_x(r.get('p90_s'))} | {_x(r.get('p99_s'))} | | |"
        )
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


def plot(rows: list[dict[str, Any]], out_dir: Path, stem: str = "routing") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        sub = [r for r in rows if r["workload"] == workload]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        extras = [a for a in dict.fromkeys(r["arm"] for r in sub) if a not in ALL_ARMS]
        for arm in dict.fromkeys(r["arm"] for r in sub):
            if arm in ALL_ARMS:
                color = COLORS[ALL_ARMS.index(arm)]
            else:
                color = EXTRA_COLORS[extras.index(arm) % len(EXTRA_COLORS)]
            pts = sorted((r["qps"], r["ttft_p90_s"], r["output_tok_s"]) for r in sub if r["arm"] == arm)
            style: dict[str, Any] = {"linewidth": 2.5 if arm.startswith("epp-tuned") or arm == "epp" else 1.3}
            style.update(color=color, linestyle="-" if arm in ALL_ARMS else "--")
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arm, **style)
            right.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=arm, **style)
        left.set_yscale("log")
        left.set_xlabel("offered QPS (requests/s)")
        left.set_ylabel("TTFT p90 (s, log scale)")
        left.set_title("TTFT p90 vs QPS (lower is better)")
        right.set_xlabel("offered QPS (requests/s)")
        right.set_ylabel("output tokens/s")
        right.set_title("Throughput vs QPS (higher is better)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        right.legend(fontsize=8)
        fig.suptitle(f"{workload}: simulated vLLM fleet (4 replicas) through each router")
        fig.tight_layout()
        path = out_dir / f"{stem}.{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write(head: dict[str, Any], runs: list[dict[str, Any]], out: Path, plots: bool = True) -> None:
    rows = aggregate(runs)
    ours = candidates(rows)
    # Tuning (any epp-tuned* arm present): rivals are the baselines and peers, not other epp variants.
    tuning = any(a != "epp" for a in ours)
    variants = tuple(dict.fromkeys(r["arm"] for r in rows if r["arm"].startswith("epp")))
    goals = [g for arm in ours for g in targets(rows, arm, variants if tuning else ())]
    doc = {"header": head, "targets": goals, "rows": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(head, rows, goals, out.stem))
    if plots and rows:
        plot(rows, out.parent, out.stem)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the .json / .md / plots from a .runs.json (e.g. after changing this report)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing.report", description=main.__doc__)
    parser.add_argument("runs", type=Path, help="a routing*.runs.json written by benchmarks.routing.run")
    args = parser.parse_args(argv)
    doc = json.loads(args.runs.read_text())
    out = args.runs.with_name(args.runs.name.removesuffix(".runs.json") + ".json")
    write(doc["header"], doc["runs"], out)
    print(f"wrote {out}, {out.with_suffix('.md')} and the plots beside them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
