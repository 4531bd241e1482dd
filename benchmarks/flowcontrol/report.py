"""Medians over repeats, the targets, and the markdown report of the flow-control benchmark.

    .venv/bin/python -m benchmarks.flowcontrol.report benchmarks/results/flowcontrol.json   # re-render .md

Targets (README: Flow control), all for `fc-on`:
  critical TTFT p90 at 150 % and 200 %  <= 1.5 x its value at 50 % (same arm, same repeat)
  standard requests at 150 %           no error at all
  sheddable requests                    every failure is a 429 or 503 that says why (dropped-reason header)
  light tenant's TTFT p90 (its critical and standard requests) at 150 % and 200 %  <= 1.5 x its value alone
  output tokens/s at 150 % and 200 %    not below fc-off's (>= 0.99x: 1 % for run-to-run noise)
Ratios are taken per repeat (arms back to back on the same sequence), then the median.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_json

LIMIT_TTFT = 1.5
THROUGHPUT_TOLERANCE = 0.99  # "not below": two runs of the same arm differ by about a percent


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _runs(runs: Sequence[dict[str, Any]], label: str, arm: str) -> dict[int, dict[str, Any]]:
    return {r["repeat"]: r for r in runs if r["label"] == label and r["arm"] == arm}


def _get(run: dict[str, Any], group: str, key: str) -> Any:
    if group == "throughput":
        return run["summary"].get("throughput", {}).get(key)
    return run["summary"].get(group, {}).get(key)


def rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (load label, arm): medians over repeats."""
    out = []
    seen: list[tuple[str, str]] = []
    for r in runs:
        if (r["label"], r["arm"]) not in seen:
            seen.append((r["label"], r["arm"]))
    for label, arm in sorted(seen, key=lambda k: (float(k[0].split("%")[0]), "alone" in k[0], k[1])):
        group = list(_runs(runs, label, arm).values())

        def med(g: str, key: str, group: list[dict[str, Any]] = group) -> Any:
            return _median([_get(r, g, key) for r in group])

        out.append(
            {
                "load": label,
                "arm": arm,
                "repeats": len(group),
                "critical_ttft_p50_s": med("critical", "ttft_p50_s"),
                "critical_ttft_p90_s": med("critical", "ttft_p90_s"),
                "standard_ttft_p90_s": med("standard", "ttft_p90_s"),
                "standard_requests": med("standard", "requests"),
                "standard_ok": med("standard", "ok"),
                "sheddable_requests": med("sheddable", "requests"),
                "sheddable_ok": med("sheddable", "ok"),
                "sheddable_429": med("sheddable", "http_429"),
                "sheddable_503": med("sheddable", "http_503"),
                "unexplained_errors": med("all", "unexplained_errors"),
                "light_ttft_p90_s": med("light/served", "ttft_p90_s"),
                "heavy_ttft_p90_s": med("heavy/served", "ttft_p90_s"),
                "output_tok_s": med("throughput", "output_tok_s"),
                "ok_req_s": med("throughput", "ok_req_s"),
                "machine_busy_cores": _median([r["machine_busy_cores"] for r in group]),
            }
        )
    return out


def _ratios(
    runs: Sequence[dict[str, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
    value: Callable[[dict[str, Any]], float | None],
) -> list[float]:
    """value(a) / value(b) per repeat, where both exist."""
    ra, rb = _runs(runs, *a), _runs(runs, *b)
    out = []
    for rep in sorted(set(ra) & set(rb)):
        x, y = value(ra[rep]), value(rb[rep])
        if x is not None and y:
            out.append(x / y)
    return out


def targets(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    labels = {r["label"] for r in runs}

    def add(name: str, value: float | None, limit: str, met: bool | None, detail: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": met, "detail": detail})

    def crit(r: dict[str, Any]) -> float | None:
        return _get(r, "critical", "ttft_p90_s")

    def light(r: dict[str, Any]) -> float | None:
        return _get(r, "light/served", "ttft_p90_s")

    def tok(r: dict[str, Any]) -> float | None:
        return _get(r, "throughput", "output_tok_s")

    for label in ("150%", "200%"):
        if label not in labels:
            continue
        on = _median(_ratios(runs, (label, "fc-on"), ("50%", "fc-on"), crit))
        off = _median(_ratios(runs, (label, "fc-off"), ("50%", "fc-off"), crit))
        met = None if on is None else on <= LIMIT_TTFT
        add(f"critical TTFT p90 at {label} vs 50 %", on, f"<= {LIMIT_TTFT}x", met, _versus_off(off))
    if "150%" in labels:
        errors = sum(
            _get(r, "standard", "requests") - _get(r, "standard", "ok")
            for r in _runs(runs, "150%", "fc-on").values()
        )
        off_errors = sum(
            _get(r, "standard", "requests") - _get(r, "standard", "ok")
            for r in _runs(runs, "150%", "fc-off").values()
        )
        add("standard requests failed at 150 %", errors, "0", errors == 0, f"fc-off: {off_errors}")
    for label in ("150%", "200%"):
        group = list(_runs(runs, label, "fc-on").values())
        if not group:
            continue
        unexplained = sum(_get(r, "sheddable", "unexplained_errors") for r in group)
        reasons: dict[str, int] = {}
        for r in group:
            for reason, n in (_get(r, "sheddable", "reasons") or {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        add(f"sheddable failures without a 429/503 reason at {label}", unexplained, "0", unexplained == 0,
            f"drops by reason: {reasons}")  # fmt: skip
    for label in ("150%", "200%"):
        if f"{label} light alone" not in labels:
            continue
        on = _median(_ratios(runs, (label, "fc-on"), (f"{label} light alone", "fc-on"), light))
        off = _median(_ratios(runs, (label, "fc-off"), (f"{label} light alone", "fc-on"), light))
        met = None if on is None else on <= LIMIT_TTFT
        add(f"light tenant TTFT p90 at {label} vs alone", on, f"<= {LIMIT_TTFT}x", met, _versus_off(off))
    for label in ("150%", "200%"):
        ratio = _median(_ratios(runs, (label, "fc-on"), (label, "fc-off"), tok))
        if ratio is not None:
            met = ratio >= THROUGHPUT_TOLERANCE
            add(f"output tokens/s at {label}, fc-on / fc-off", ratio, f">= {THROUGHPUT_TOLERANCE}x", met, "")
    return out


def _versus_off(ratio: float | None) -> str:
    return "" if ratio is None else f"fc-off: {ratio:.2f}x"


def _s(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _n(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def markdown(head: dict[str, Any], table: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> str:
    fleet, load = head["fleet"], head["workload"]
    minutes = head.get("runtime_s", 0) / 60
    lines = [
        "# Flow control under overload",
        "",
        f"`{head['command']}` ({head['date_utc']}, {minutes:.1f} min, {head['mode']} mode, "
        f"{head['repeats']} repeat(s)); machine: {head['nproc']} cores, {head['machine_memory_gib']} GiB, "
        "shared with other work (`busy` = the whole machine's busy cores during the run).",
        "",
        f"Fleet: {fleet['replicas']} simulated vLLM replicas, {fleet['profile']} in real time, "
        f"{fleet['num_gpu_blocks']} KV blocks each; saturation (round-robin keeps up) "
        f"{head['saturation_qps']:.2f} req/s. Workload: {load['arrival_seconds_per_run']:g} s of Poisson "
        "arrivals per run; critical 15 % / standard 35 % / sheddable 50 % of requests, tenants heavy 80 % / "
        "light 20 %; prompts 500-2000 tokens, 64-192 output tokens, streamed. Arms: `fc-off` (no flow "
        "control: sheddable gets 429 while saturated, the rest goes to a model server at once), `fc-on` "
        "(flow control, defaults). Medians over repeats; TTFT in seconds; counts per run.",
        "",
    ]
    columns = ["load", "arm", "critical p50 / p90", "standard p90 (ok / sent)", "sheddable ok / 429 / 503",
               "unexplained errors", "light p90", "heavy p90", "output tok/s", "busy"]  # fmt: skip
    body = []
    for r in table:
        body.append([
            r["load"], r["arm"], f"{_s(r['critical_ttft_p50_s'])} / {_s(r['critical_ttft_p90_s'])}",
            f"{_s(r['standard_ttft_p90_s'])} ({_n(r['standard_ok'])} / {_n(r['standard_requests'])})",
            f"{_n(r['sheddable_ok'])} / {_n(r['sheddable_429'])} / {_n(r['sheddable_503'])}",
            _n(r["unexplained_errors"]), _s(r["light_ttft_p90_s"]), _s(r["heavy_ttft_p90_s"]),
            None if r["output_tok_s"] is None else f"{r['output_tok_s']:.0f}",
            f"{r['machine_busy_cores']:.2f}",
        ])  # fmt: skip
    lines.append(markdown_table(columns, body))
    lines.append("`light p90` / `heavy p90`: TTFT p90 of the tenant's critical and standard requests.\n")
    lines.append("## Targets (fc-on)\n")
    target_rows = []
    for c in checks:
        value = c["value"]
        shown = f"{value:.3f}x" if isinstance(value, float) else _n(value)
        met = "–" if c["met"] is None else ("**met**" if c["met"] else "**not met**")
        target_rows.append([c["target"], shown, c["limit"], met, c["detail"]])
    lines.append(markdown_table(["target", "value", "limit", "", "detail"], target_rows))
    return "\n".join(lines)


def write(head: dict[str, Any], runs: Sequence[dict[str, Any]], out: Path) -> None:
    table = rows(runs)
    checks = targets(runs)
    write_json(out, {"header": head, "rows": table, "targets": checks, "runs": list(runs)})
    out.with_suffix(".md").write_text(markdown(head, table, checks))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m benchmarks.flowcontrol.report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    doc = json.loads(path.read_text())
    write(doc["header"], doc["runs"], path)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
