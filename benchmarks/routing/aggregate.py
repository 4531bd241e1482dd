"""The runs of the routing benchmark as rows: one per workload, arm and load, medians over repeats."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from benchmarks.routing.arms import ALL_ARMS

BASELINE = "round-robin"
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


def get(d: dict[str, Any] | None, *path: str) -> Any:
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
        "ttft_p50_s": get(s, "ttft", "p50_s"),
        "ttft_p90_s": get(s, "ttft", "p90_s"),
        "ttft_p99_s": get(s, "ttft", "p99_s"),
        "ttft_mean_s": get(s, "ttft", "avg_s"),
        "server_ttft_mean_s": run["fleet"].get("server_ttft_mean_s"),
        "e2e_p50_s": get(s, "e2e", "p50_s"),
        "e2e_p99_s": get(s, "e2e", "p99_s"),
        "tpot_p50_s": get(s, "tpot", "p50_s"),
        "output_tok_s": s.get("output_tok_s"),
        "req_s": s.get("req_s"),
        "errors": s.get("errors"),
        "rejected_429": s.get("rejected_429"),
        "hit_rate": run["fleet"].get("prefix_hit_rate"),
        "lora_loads": run["fleet"].get("lora_loads"),
        "client_hit_rate": (s.get("cached_tokens") or 0) / prompt if prompt else None,
        "schedule_lag_p99_s": get(s, "schedule_lag", "p99_s"),
        "machine_busy_cores": run.get("machine_busy_cores"),
        "other_tenants_cores": run.get("other_tenants_cores"),
    }
    for name, util in run.get("cpu_util", {}).items():
        row[f"cpu_{name}"] = util
    return row


def median(values: list[Any]) -> Any:
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
            "qps": median([r["qps"] for r in group]),
        }
        row.update({k: median([f.get(k) for f in flats]) for k in keys})
        if workload != "multi-lora":
            row.pop("lora_loads", None)
        row["repeats"] = len(group)
        rows.append(row)
    order = {"shared-prefix": 0, "multi-turn": 1, "multi-lora": 2, "no-sharing": 3}
    arm_order = {a: i for i, a in enumerate(ALL_ARMS)}
    rows.sort(key=lambda r: (order.get(r["workload"], 9), r["load"], arm_order.get(r["arm"], 99), r["arm"]))
    return rows


def find(rows: list[dict[str, Any]], workload: str, arm: str, load: float) -> dict[str, Any] | None:
    return next((r for r in rows if (r["workload"], r["arm"], r["load"]) == (workload, arm, load)), None)


def ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return None
    return a / b
