"""overhead.md: the tables and notes of the overhead benchmark, from the header and the summary."""

from __future__ import annotations

from pathlib import Path

from benchmarks.overhead.arms import BASELINE_ENDPOINTS, MODES, Settings
from benchmarks.overhead.summary import REFERENCE_RATE, TARGET_P50_DELTA_MS, TARGET_RPS_RATIO, median
from epp_lab.tables import records_table


def cpu_notes(summary: dict) -> list[str]:
    """Computed from this run's steps (passing ones only, where CPU per request is not inflated by drops)."""
    steps = [s for s in summary["steps"] if s["ok"]]

    def med(values: list[float | None]) -> float | None:
        got = median(values)
        return None if got is None else round(got, 2)

    out = []
    for mode in MODES:
        noop = {s["rate"]: s for s in steps if s["arm"] == "noop-extproc" and s["mode"] == mode}
        if not noop:
            continue
        floor = med([s["cpu_s_per_1k"] for s in noop.values()])
        envoy = med([s["envoy_cpu_s_per_1k"] for s in noop.values()])
        k6 = med([s["k6_cpu_s_per_1k"] for s in noop.values()])
        text = (
            f"- `{mode}`: the no-op ext_proc uses {floor} CPU s per 1k requests, i.e. {floor} ms of CPU per "
            f"request (the grpc.aio floor); the front Envoy {envoy}, k6 {k6} (medians over passing steps)."
        )
        extra = []
        for n in sorted({s["endpoints"] for s in steps if s["arm"] == "epp" and s["mode"] == mode}):
            diffs = [
                s["cpu_s_per_1k_net_of_idle"] - noop[s["rate"]]["cpu_s_per_1k"]
                for s in steps
                if s["arm"] == "epp" and s["mode"] == mode and s["endpoints"] == n and s["rate"] in noop
                and s["cpu_s_per_1k_net_of_idle"] is not None and noop[s["rate"]]["cpu_s_per_1k"] is not None
            ]  # fmt: skip
            idle = next(
                (x["idle_picker_cores"] for x in summary["sustainable"]
                 if (x["arm"], x["mode"], x["endpoints"]) == ("epp", mode, n)),
                None,
            )  # fmt: skip
            if diffs:
                extra.append(f"{n} endpoints {med(diffs):+g} ms per request, {idle} cores idle")
        if extra:
            text += (
                " epp's CPU over the no-op's at the same rates, net of epp's idle CPU: "
                + "; ".join(extra)
                + " (idle = metrics scraping alone, no traffic)."
            )
        out.append(text)
    return out or ["(no passing no-op steps)"]


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{'transport' if k == '0' else k}: {v}" for k, v in sorted(counts.items()))


def write_markdown(path: Path, header: dict, summary: dict, settings: Settings) -> None:
    busy = header.get("busy_machine_note", "")
    lines = [
        "# Picker cost through Envoy (benchmark B)",
        "",
        f"`{header['command']}` · {header['date_utc']} · nproc {header['nproc']} · "
        f"memory {round((header['machine_memory_bytes'] or 0) / 2**30, 1)} GiB · {header['envoy']} · "
        f"{header['k6']} · Python {header['python']} · {'quick' if settings.quick else 'full'} mode, "
        f"{settings.repeats} repeat(s), {settings.step_s:g} s per step · commit "
        f"{(header.get('git_commit') or '?')[:10]}"
        + (
            f" with uncommitted changes in {', '.join(header['epp_uncommitted_files'])}"
            if header.get("epp_uncommitted_files")
            else ""
        ),
        "",
        "k6 `constant-arrival-rate` POSTs a ~1 KB non-streaming `/v1/chat/completions` to Envoy "
        "(1 worker), which forwards to an instant upstream (Envoy `direct_response` on N ports). "
        f"A step passes with errors < {settings.max_error_rate:.0%}, p99 ≤ {settings.p99_bound_ms:g} ms, "
        "dropped iterations < 1 % and ≥ 90 % of the target rate achieved; *sustainable* = highest "
        "passing rate (ladder, a failed step is retried once, then the gap is bisected). `cpu s/1k` = "
        "the picker process's CPU seconds (utime + stime) per 1,000 requests during the step, including "
        "its background metrics scraping; `net` subtracts the picker's idle CPU rate (scraping only). "
        "`others` = cores used by processes outside the benchmark (other tenants of the machine).",
        "",
    ]
    if busy:
        lines += [f"**{busy}**", ""]
    lines += ["## Sustainable requests/s", ""]
    lines.append(
        records_table(
            [
                {
                    "arm": s["arm"],
                    "mode": s["mode"],
                    "endpoints": s["endpoints"],
                    "sustainable rate": s["sustainable_rate"] or f"< {settings.rates[0]}",
                    "achieved rps": s["achieved_rps_at_it"],
                    "per repeat": ", ".join(map(str, s["per_repeat"])),
                    "idle picker cores": s["idle_picker_cores"],
                    "idle upstream cores": s["idle_upstream_cores"],
                }
                for s in summary["sustainable"]
            ]
        )
    )
    lines += ["", "## Targets (picker vs the no-op ext_proc, same mode)", ""]
    lines.append(
        f"Targets: at {BASELINE_ENDPOINTS} endpoints the picker sustains ≥ {TARGET_RPS_RATIO:.0%} of the "
        f"no-op's requests/s, and adds ≤ {TARGET_P50_DELTA_MS:g} ms to p50 at {REFERENCE_RATE} requests/s. "
        "Rows at 8 and 256 endpoints and the `+resp-none` rows (response body not sent to the picker) are "
        "for context; their verdicts are in parentheses."
    )
    lines.append("")

    def verdict(flag: bool, evaluated: bool) -> str:
        text = "met" if flag else "NOT met"
        return text if evaluated else f"({text})"

    lines.append(
        records_table(
            [
                {
                    "mode": t["mode"],
                    "endpoints": t["endpoints"],
                    "epp rps": t["epp_sustainable"],
                    "no-op rps": t["noop_sustainable"],
                    "ratio": t["rps_ratio"],
                    "≥ 85 %": verdict(t["rps_target_met"], t["evaluated"]),
                    f"p50 Δ @ {REFERENCE_RATE}/s (ms)": (
                        t["p50_delta_ms"]
                        if t["reference_steps_passed"]
                        else f"{'–' if t['p50_delta_ms'] is None else t['p50_delta_ms']} (step failed)"
                    ),
                    "≤ 1 ms": verdict(t["p50_target_met"], t["evaluated"]),
                    "p50 Δ at other common passing rates (ms)": ", ".join(
                        f"{d['rate']}: {d['p50_delta_ms']:+g}"
                        for d in t["p50_delta_by_rate"]
                        if d["rate"] != REFERENCE_RATE
                    ),
                }
                for t in summary["targets"]
            ]
        )
    )
    lines += ["", "## Where the CPU goes", ""]
    lines += cpu_notes(summary)
    lines += ["", "## Every step (medians over repeats)", ""]
    lines.append(
        records_table(
            [
                {
                    "arm": s["arm"],
                    "mode": s["mode"],
                    "endpoints": s["endpoints"],
                    "rate": s["rate"],
                    "achieved rps": s["achieved_rps"],
                    "p50 ms": s["p50_ms"],
                    "p99 ms": s["p99_ms"],
                    "errors": s["errors"]
                    if not s["failed_by_status_all_repeats"]
                    else f"{s['errors']} ({_statuses(s['failed_by_status_all_repeats'])})",
                    "dropped": s["dropped"],
                    "cpu s/1k": s["cpu_s_per_1k"],
                    "net": s["cpu_s_per_1k_net_of_idle"],
                    "envoy s/1k": s["envoy_cpu_s_per_1k"],
                    "k6 s/1k": s["k6_cpu_s_per_1k"],
                    "others": s["other_tenants_cores"],
                    "pass": "yes" if s["ok"] else "no",
                }
                for s in summary["steps"]
            ]
        )
    )
    path.write_text("\n".join(lines) + "\n")
