"""The TTFT cross-check record: k6's time to first byte vs the Python client's time to the first SSE token."""

from __future__ import annotations

from typing import Any

from benchmarks.routing.aggregate import ratio


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
            k: ratio(out["k6_http_req_waiting"][k], out["python_client"][k])
            for k in ("avg_s", "p50_s", "p90_s", "p99_s")
        }
    return out
