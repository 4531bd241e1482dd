"""Medians over repeats and the markdown page of the inference-perf benchmark (benchmarks/results/
inference_perf.md), with the routing benchmark's k6 numbers for the same points beside them."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

from benchmarks.common import RESULTS_DIR, markdown_table

MEDIAN_KEYS = (
    "ttft_mean_s",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "tpot_p50_s",
    "output_tok_s",
    "req_s",
    "cached_share",
    "schedule_delay_p99_s",
)
SUM_KEYS = ("sent", "ok", "errors")
ROUTING_RESULTS = RESULTS_DIR / "routing.json"
LATE_CLIENT_S = 0.05  # a run whose p99 schedule delay exceeds this was held up by the machine


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if isinstance(v, int | float)]
    return statistics.median(present) if present else None


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (load, arm): medians over repeats (counts summed), in run order of loads then arms."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["load"], run["arm"])].append(run)
    arm_order = list(dict.fromkeys(r["arm"] for r in sorted(runs, key=lambda r: r.get("repeat", 0))))
    rows = []
    for (load, arm), group in sorted(groups.items(), key=lambda kv: (kv[0][0], arm_order.index(kv[0][1]))):
        row: dict[str, Any] = {"load": load, "qps": group[0]["qps"], "arm": arm, "repeats": len(group)}
        for key in MEDIAN_KEYS:
            row[key] = _median([r["metrics"].get(key) for r in group])
        for key in SUM_KEYS:
            row[key] = sum(int(r["metrics"].get(key) or 0) for r in group)
        p90s = [r["metrics"]["ttft_p90_s"] for r in group if r["metrics"].get("ttft_p90_s") is not None]
        row["ttft_p90_min_s"], row["ttft_p90_max_s"] = (min(p90s), max(p90s)) if p90s else (None, None)
        row["fleet_hit_rate"] = _median([r["fleet"].get("prefix_hit_rate") for r in group])
        row["error_labels"] = sorted({label for r in group for label in r["metrics"].get("error_labels", {})})
        row["inference_perf_cores_max"] = max(
            r["inference_perf_cpu_s"] / r["inference_perf_wall_s"]
            for r in group
            if r["inference_perf_wall_s"]
        )
        rows.append(row)
    rr = {r["load"]: r for r in rows if r["arm"] == "round-robin"}
    for row in rows:
        base = rr.get(row["load"])
        row["ttft_p90_vs_rr"] = _ratio(row["ttft_p90_s"], base["ttft_p90_s"]) if base else None
        row["output_tok_s_vs_rr"] = _ratio(row["output_tok_s"], base["output_tok_s"]) if base else None
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _k6_rows() -> dict[tuple[float, str], dict[str, Any]]:
    """The routing benchmark's committed shared-prefix medians (k6 on epp_lab's generator), if present."""
    try:
        doc = json.loads(ROUTING_RESULTS.read_text())
    except (OSError, ValueError):
        return {}
    return {(r["load"], r["arm"]): r for r in doc.get("rows", []) if r.get("workload") == "shared-prefix"}


def markdown(head: dict[str, Any], rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    v = head["versions"]
    params = head["workload"]["params"]
    count = head["workload"]["requests_per_run"]
    fleet = head["fleet"]
    ip = head["inference_perf_config_template"]
    sp = ip["data"]["shared_prefix"]
    loads = [r["load_average_at_start"][0] for r in runs if r.get("load_average_at_start")]
    busy = [r["machine_busy_cores"] for r in runs]
    dirty = head["git"]["uncommitted"]
    peers = "".join(f", {n} {v[n]}" for n in ("vllm-router", "sglang-router") if n in v)
    scorers = head["epp_configs"].get("epp")
    out = [
        "# Shared-prefix routing measured with upstream's inference-perf",
        "",
        f"Command: `{head['command']}` ({head['mode']} mode, {head['repeats']} repeat(s), medians over "
        f"repeats); {head['date_utc']}; runtime {head['runtime_s'] / 60:.1f} min.",
        "",
        f"Machine: `{head['uname']}`; nproc {head['nproc']}, "
        f"{(head.get('machine_memory_bytes') or 0) / 2**30:.1f} GiB. **Shared with other tenants**: "
        f"load average {head['load_average_at_start']} at the start, {head.get('load_average_at_end')} at "
        f"the end, 1-min load {min(loads, default=0):.1f}-{max(loads, default=0):.1f} at the starts of the "
        f"runs; the whole machine was {min(busy, default=0):.2f}-{max(busy, default=0):.2f} cores busy "
        f"during the runs (of {head['nproc']}).",
        "",
        f"Code: commit {head['git']['commit']}"
        + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "")
        + f". Versions: inference-perf {v['inference-perf']}, epp {v['epp']}, envoy {v['envoy']}{peers}.",
        "",
        "## Setup",
        "",
        f"- Fleet: {fleet['replicas']} simulated vLLM replicas (`epp sim`, profile `{fleet['profile']}`, "
        f"{fleet.get('num_gpu_blocks')} KV blocks each) at time scale {fleet['time_scale']} (the simulated "
        f"GPUs run {1 / fleet['time_scale']:g}x faster than the profile: latencies are real seconds, ratios "
        f"are unaffected), SSE tokens grouped by {fleet['stream_interval']}; a fresh fleet (cold caches) and "
        "a fresh arm for every run. Arms as in the routing benchmark (`benchmarks/routing/arms.py`): Envoy "
        "round-robin / least-request, the peers' cache-aware policies, epp behind real Envoy (ext_proc)"
        + (f" with scorers {scorers}" if scorers else "")
        + ".",
        f"- Load: inference-perf {v['inference-perf']}, `data.type: shared_prefix` with num_groups "
        f"{sp['num_groups']}, num_prompts_per_group {sp['num_prompts_per_group']}, system_prompt_len "
        f"{sp['system_prompt_len']}, question_len {sp['question_len']}, output_len {sp['output_len']}: the "
        f"routing benchmark's shared-prefix workload ({params['groups']} groups, "
        f"{params['system_tokens']}-token system prompts, {params['question_tokens']}-token questions, "
        f"{params['output_tokens']} output tokens). Its {params['users']} users only label the questions "
        f"(every request has a question of its own), so {sp['num_groups']} x {sp['num_prompts_per_group']} "
        f"distinct prompts cover the {count} requests of a run without repeats. Poisson arrivals, one stage "
        f"of ~{count} requests per run; streaming on `/v1/completions` (what the generator sends for text); "
        f"one worker process with a concurrency cap of {ip['load']['worker_max_concurrency']} (open loop).",
        "- Tokenizer: a word-level tokenizer built at run time (`benchmarks/inference_perf/tokenizer.py`, "
        "3-letter words: N tokens are 4N - 1 characters, which the simulator counts as N tokens), offline.",
        f"- Rates: fractions of round-robin's saturation QPS ({head['rr_saturation_qps']:.1f} req/s, "
        "calibrated on the simulator's engine as the routing benchmark does).",
        "- Columns are inference-perf's own summary report: TTFT = time to the first streamed token, e2e = "
        "request latency, tok/s and req/s over its benchmark window (first send to last completion), "
        "errors = failed requests; cached = the share of prompt tokens the fleet reported as prefix-cache "
        "hits (`usage.prompt_tokens_details.cached_tokens`, aggregated by inference-perf). Below saturation "
        "every arm completes what is offered, so tok/s follows the offered load (and inference-perf's "
        "unseeded arrivals, see below); at 200 % every arm is saturated and tok/s is its capacity.",
        "",
        "## Results",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                f"{r['load']:.0%}",
                f"{r['qps']:.1f}",
                r["arm"],
                f"{r['ok']}/{r['sent']}",
                str(r["errors"]) + (f" ({', '.join(r['error_labels'])})" if r["error_labels"] else ""),
                _f(r["ttft_p50_s"]),
                _f(r["ttft_p90_s"]),
                f"{_f(r['ttft_p90_min_s'])}-{_f(r['ttft_p90_max_s'])}",
                _f(r["ttft_p99_s"]),
                _f(r["e2e_p50_s"]),
                _f(r["output_tok_s"], 0),
                _f(r["req_s"], 1),
                _f(r["cached_share"], 2),
                _x(r["ttft_p90_vs_rr"]),
                _x(r["output_tok_s_vs_rr"]),
                str(r["repeats"]),
            ]
        )
    out.append(
        markdown_table(
            [
                "load",
                "QPS",
                "arm",
                "ok/sent",
                "errors",
                "TTFT p50 (s)",
                "TTFT p90 (s)",
                "p90 min-max",
                "TTFT p99 (s)",
                "e2e p50 (s)",
                "out tok/s",
                "req/s",
                "cached",
                "TTFT p90 vs RR",
                "tok/s vs RR",
                "runs",
            ],
            table,
        )
    )
    k6 = _k6_rows()
    if k6:
        out += [
            "",
            "## Beside the routing benchmark (k6 on the lab's own generator)",
            "",
            "The same points of `benchmarks/results/routing.md` (k6 replaying `epp_lab.loadgen`'s "
            "shared-prefix requests on chat completions, taken on another day on the same kind of machine): "
            "TTFT p90 in seconds and as a ratio to round-robin at the same load, per tool.",
            "",
        ]
        cross = []
        for r in rows:
            k = k6.get((r["load"], r["arm"]))
            krr = k6.get((r["load"], "round-robin"))
            cross.append(
                [
                    f"{r['load']:.0%}",
                    r["arm"],
                    _f(r["ttft_p90_s"]),
                    _x(r["ttft_p90_vs_rr"]),
                    _f(k["ttft_p90_s"]) if k else "-",
                    _x(_ratio(k["ttft_p90_s"], krr["ttft_p90_s"])) if k and krr else "-",
                    _f(r["output_tok_s"], 0),
                    _f(k["output_tok_s"], 0) if k else "-",
                ]
            )
        out.append(
            markdown_table(
                [
                    "load",
                    "arm",
                    "inference-perf TTFT p90",
                    "vs RR",
                    "k6 TTFT p90",
                    "vs RR",
                    "inference-perf tok/s",
                    "k6 tok/s",
                ],
                cross,
            )
        )
    delays = [d for r in runs if (d := r["metrics"].get("schedule_delay_p99_s")) is not None]
    cores = [
        r["inference_perf_cpu_s"] / r["inference_perf_wall_s"] for r in runs if r["inference_perf_wall_s"]
    ]
    late = [
        f"{r['arm']} {r['load']:.0%} repeat {r.get('repeat', 0)}"
        for r in runs
        if (r["metrics"].get("schedule_delay_p99_s") or 0) > LATE_CLIENT_S
    ]
    failed = "".join(
        f"\n  - {f['arm']} at {f['load']:.0%} (repeat {f['repeat']}): {f['error'][:300]}"
        for f in head["failed_runs"]
    )
    out += [
        "",
        "## Client and machine",
        "",
        "- inference-perf (its main process and worker, start-up and prompt generation included) used at "
        f"most {max(cores, default=0):.2f} of a core on average over a run; its p99 schedule delay (send "
        f"time - scheduled time) was at most {max(delays, default=0) * 1000:.1f} ms; "
        f"{sum(d > LATE_CLIENT_S for d in delays)} of {len(runs)} runs had a p99 over "
        f"{LATE_CLIENT_S * 1000:.0f} ms ({', '.join(late) or 'none'}): the client itself sent late "
        "while both cores were busy (other tenants, and at 200 % the fleet and the routers), which widens "
        "those runs' TTFT tails (see the p90 min-max column); ratios between arms remain large.",
        f"- Skipped arms: {head['skipped_arms'] or 'none'}; failed runs: {len(head['failed_runs'])}{failed}",
        "",
        "## Differences from upstream's published setup",
        "",
        "- Upstream runs inference-perf against real vLLM pods on GPUs with the model's own tokenizer; here "
        "the fleet is the lab's simulator (scaled time) and the tokenizer a word-level stand-in whose token "
        "counts match the simulator's. Absolute latencies are the simulator's, not a GPU's.",
        "- Upstream's shared-prefix runs use their own sizes and rate sweeps; here the sizes are the routing "
        "benchmark's shared-prefix workload and the rates fixed fractions of round-robin's capacity, one "
        "fresh fleet per point, so that the two tools can be compared point by point.",
        "- inference-perf's Poisson timer is not seeded (per-second counts from an unseeded generator, each "
        "second's requests spread evenly): arms see the same prompts in the same order, not the same "
        "arrival times; the repeats absorb that.",
    ]
    return "\n".join(out) + "\n"
