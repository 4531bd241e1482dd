"""The soak's result files: `<name>.json` (header, totals, restarts, resources, every sample and every request
that was not ok), `<name>.md` (the tables) and `<name>.png` (the picker's RSS, fds, tasks and prefix index
over time, kills marked). `python -m benchmarks.soak.report benchmarks/results/soak.json` re-renders the
page and the plot from the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_json

MB = 1024 * 1024
RESOURCES = (  # (key in a sample, label, scale)
    ("rss_bytes", "picker RSS (MiB)", MB),
    ("fds", "picker open fds", 1),
    ("tasks", "picker asyncio tasks", 1),
    ("active_streams", "picker ext_proc streams open", 1),
    ("inflight", "picker in-flight requests (all endpoints)", 1),
    ("prefix_index_entries", "prefix-index entries", 1),
    ("queue_size", "flow-control queue", 1),
    ("envoy_rss_bytes", "Envoy RSS (MiB)", MB),
    ("envoy_fds", "Envoy open fds", 1),
)


def _stats(samples: list[dict[str, Any]], key: str, scale: float) -> dict[str, float | None]:
    values = [s[key] / scale for s in samples if s.get(key) is not None]
    if not values:
        return {"start": None, "peak": None, "end": None}
    return {"start": round(values[0], 2), "peak": round(max(values), 2), "end": round(values[-1], 2)}


def build(head: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The result document: header, request totals, restarts, resources (start/peak/end under load, idle
    before and settled after), the samples and the failures."""
    summary, failures, samples = result["summary"], result["failures"], result["samples"]
    started = result["started_at"]
    idle_streams = result["idle_before"].get("streams_total") or 0
    first = next((s["t"] for s in samples if (s.get("streams_total") or 0) > idle_streams), 0.0)
    under_load = [s for s in samples if first <= s["t"] <= result["load_s"]]  # from the first request on
    classes = {c: sum(1 for f in failures if f["class"] == c) for c in ("killed", "lost", "hung")}
    requests = {
        "sent": summary["sent"],
        "ok": summary["ok"],
        "failed": summary["failed"],
        "on_killed_replica": classes["killed"],
        "lost": classes["lost"],
        "hung": classes["hung"],
        "dropped_iterations": summary["dropped_iterations"],
        "ttft_ms": summary["ttft_ms"],
        "e2e_ms": summary["e2e_ms"],
        "achieved_rps": round(summary["sent"] / summary["wall_s"], 1) if summary["wall_s"] else None,
    }
    restarts = []
    for r in result["restarts"]:

        def rel(value: float | None, base: float) -> float | None:
            return None if value is None else round(value - base, 3)

        on_it = [f for f in failures if f["class"] == "killed" and r["kill_at"] <= f["end"] / 1000
                 and f["start"] / 1000 <= (r["back_at"] or r["ready_at"] or float("inf"))]  # fmt: skip
        restarts.append({
            "replica": r["replica"], "address": r["address"], "killed_at_s": rel(r["kill_at"], started),
            "unreachable_after_s": rel(r["unreachable_at"], r["kill_at"]),
            "down_s": rel(r["ready_at"], r["kill_at"]),
            "back_after_restart_s": rel(r["back_at"], r["ready_at"]),
            "requests_failed_with_it": len(on_it),
        })  # fmt: skip
    resources = {}
    for key, label, scale in RESOURCES:
        row = _stats(under_load, key, scale)
        before, settled = result["idle_before"].get(key), result["settled"].get(key)
        row["idle_before"] = None if before is None else round(before / scale, 2)
        row["settled_after"] = None if settled is None else round(settled / scale, 2)
        resources[key] = {"label": label, **row}
    bound = result["prefix_index_bound"]
    index_peak = resources["prefix_index_entries"]["peak"]
    checks = {
        "lost == 0": requests["lost"] == 0,
        "hung == 0": requests["hung"] == 0,
        f"prefix index <= bound ({bound})": index_peak is not None and index_peak <= bound,
        "picker streams and in-flight back to 0 after the load": (
            result["settled"].get("active_streams") == 0 and result["settled"].get("inflight") == 0
        ),
        "flow-control queue back to 0": not result["settled"].get("queue_size"),
    }
    return {
        "header": head,
        "requests": requests,
        "restarts": restarts,
        "resources": resources,
        "prefix_index_bound": bound,
        "checks": checks,
        "started_at": started,
        "load_s": result["load_s"],
        "duration_s": round(result["ended_at"] - started, 1),
        "samples": samples,
        "failures": failures,
    }


def markdown(doc: dict[str, Any], name: str) -> str:
    h, req = doc["header"], doc["requests"]
    s = h["settings"]
    load_start, load_end = h.get("load_average_at_start"), h.get("load_average_at_end")
    lines = [
        "# Soak: streaming load with replicas restarting",
        "",
        f"`{h['command']}` on {h['date_utc']} ({h['uname']}, nproc {h['nproc']}, load average at start "
        f"{load_start}, at end {load_end}; commit {h['git_commit'][:10]}"
        f"{' + local changes' if h['git_dirty'] else ''}; {h.get('envoy') or 'envoy ?'}; "
        f"{h.get('k6') or 'k6 ?'}).",
        "",
        f"k6 `constant-arrival-rate` at **{s['rate']} requests/s** for {s['minutes']:g} min "
        f"({doc['duration_s']:.0f} s with the drain): streamed chat completions ({s['max_tokens']} output "
        "tokens, 16 shared ~1,000-token system prompts + a unique question), through Envoy "
        f"(`{s['envoy_shape']}` shape) and the picker (defaults"
        f"{', flow control on' if s['flow_control'] else ''}) to {s['replicas']} simulated H100 replicas "
        f"(time scale {s['time_scale']:g}, {s['num_gpu_blocks']} KV blocks each), one process each. Every "
        f"{s['restart_every_s']:g} s from {s['restart_every_s'] / 2:g} s on, one replica is SIGKILLed, left "
        f"down {s['down_s']:g} s and started again at its address. The rate is "
        f"{s['rate'] / s['picker_sustainable_rps']:.0%} of the picker's sustainable "
        f"{s['picker_sustainable_rps']} requests/s (`overhead.md`, non-streamed, 8 endpoints) and "
        f"{s['rate'] / s['picker_streamed_rps_per_core']:.0%} of one picker core's ~"
        f"{s['picker_streamed_rps_per_core']} streamed requests/s (`overhead_streaming.md`); the 2-core "
        "machine also runs Envoy, k6 and the replicas. See `benchmarks/soak/run.py` for the method.",
        "",
        "## Requests",
        "",
        markdown_table(
            [
                "sent",
                "ok",
                "not ok",
                "on a killed replica",
                "**lost**",
                "**hung**",
                "not sent (k6 dropped)",
                "req/s",
                "TTFT p50 / p99 ms",
                "e2e p50 / p99 ms",
            ],
            [
                [
                    req["sent"],
                    req["ok"],
                    req["failed"],
                    req["on_killed_replica"],
                    req["lost"],
                    req["hung"],
                    req["dropped_iterations"],
                    req["achieved_rps"],
                    f"{_ms(req['ttft_ms']['p50'])} / {_ms(req['ttft_ms']['p99'])}",
                    f"{_ms(req['e2e_ms']['p50'])} / {_ms(req['e2e_ms']['p99'])}",
                ]
            ],
        ),
        "",
        "A request is *on a killed replica* when it failed while a replica was down (from its kill until "
        "the picker marked it reachable again) in the way a dead replica fails requests: its stream, "
        "answered by that replica, ended without `[DONE]`, or Envoy answered 502/503 for a refused or reset "
        "connection, or the connection failed. Anything else is *lost*; *hung* = still open at k6's 60 s "
        "timeout.",
        "",
        "## Replica restarts",
        "",
        markdown_table(
            [
                "replica",
                "killed at (s)",
                "picker marks it unreachable after (s)",
                "down (s)",
                "picker marks it reachable after its restart (s)",
                "requests failed with it",
            ],
            [
                [
                    r["address"],
                    r["killed_at_s"],
                    r["unreachable_after_s"],
                    r["down_s"],
                    r["back_after_restart_s"],
                    r["requests_failed_with_it"],
                ]
                for r in doc["restarts"]
            ],
        ),
        "",
        "## Picker resources (sampled every " + f"{s['sample_s']:g} s)",
        "",
        markdown_table(
            [
                "",
                "idle before",
                "start (first sample under load)",
                "peak",
                "end (last sample under load)",
                "settled after",
            ],
            [
                [v["label"], v["idle_before"], v["start"], v["peak"], v["end"], v["settled_after"]]
                for v in doc["resources"].values()
            ],
        ),
        "",
        f"Prefix-index bound: {doc['prefix_index_bound']} entries (4 endpoints x the capacity the scorer "
        "sizes from each server's `cache_config_info`: num_gpu_blocks x 16 tokens x 4 characters / 64 "
        "characters per block).",
        "",
        "## Checks",
        "",
        markdown_table(["check", "met"], [[k, "yes" if v else "**no**"] for k, v in doc["checks"].items()]),
        "",
        f"![picker resources over time]({name}.png)",
        "",
    ]
    lost = [f for f in doc["failures"] if f["class"] != "killed"]
    if lost:
        lines += ["## Lost and hung requests", "", markdown_table(
            ["n", "class", "status", "error", "replica", "start (s)", "length (s)", "body head"],
            [[f["n"], f["class"], f["status"], f["error"], f["replica"],
              round(f["start"] / 1000 - doc["started_at"], 2),
              round((f["end"] - f["start"]) / 1000, 3), f["head"][:80]] for f in lost[:50]],
        ), ""]  # fmt: skip
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in doc["samples"] if s["t"] > 0]  # the whole load, from its first sample
    t = [s["t"] / 60 for s in samples]
    panels = [
        ("picker RSS (MiB)", [("rss_bytes", MB, "RSS")]),
        ("picker open fds", [("fds", 1, "fds")]),
        ("tasks / streams", [("tasks", 1, "asyncio tasks"), ("active_streams", 1, "ext_proc streams open")]),
        ("prefix-index entries", [("prefix_index_entries", 1, "entries")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 9), sharex=True)
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, scale, label in series:
            ax.plot(t, [(s.get(key) or 0) / scale for s in samples], label=label)
        if title.startswith("prefix"):
            ax.axhline(doc["prefix_index_bound"], color="grey", linestyle=":", label="bound")
        for r in doc["restarts"]:
            ax.axvline(r["killed_at_s"] / 60, color="red", alpha=0.3, linestyle="--")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("minutes (dashed: a replica killed)")
    fig.suptitle(f"soak: {doc['header']['settings']['rate']} requests/s, replicas restarting")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(out: Path, name: str, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", doc)
    (out / f"{name}.md").write_text(markdown(doc, name))
    plot(doc, out / f"{name}.png")


if __name__ == "__main__":
    source = Path(sys.argv[1])
    document = json.loads(source.read_text())
    write(source.parent, source.name.removesuffix(".json"), document)
