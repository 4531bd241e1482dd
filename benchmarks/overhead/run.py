"""Picker cost: what does the picker add to a request through Envoy? (docs: benchmarks.md, section B)

Real k6 (`benchmarks/k6/overhead.js`, constant arrival rate, ~1 KB non-streaming chat completion) through
real Envoy to an "instant upstream" (`upstream.py`: one Envoy answering on N ports with `direct_response`).
Arms, each in its own processes, run back to back (and in rotated order over repeats):

    no-extproc    Envoy `direct` shape, ROUND_ROBIN over 64 instant endpoints (no picker at all)
    noop-extproc  Envoy `gateway` (FULL_DUPLEX_STREAMED) / `buffered` shape → `noop_extproc.py`, which sends
                  every request to one fixed endpoint: the floor for any grpc.aio picker
    epp           the same two shapes → `epp serve --plaintext` (default config: full scheduling, 50 ms
                  metrics scrape) over 8, 64 or 256 instant endpoints

Modes `full-duplex` and `buffered` are the shipped shapes; `+resp-none` variants set the ext_proc filter's
response_body_mode to NONE (no-op and epp at 64 endpoints) to show what passing the response body through
the picker costs. Quick mode runs `full-duplex+resp-none` only; full mode both.

Each arm climbs a ladder of constant rates. A step *passes* when errors < 1 %, p99 ≤ the bound (50 ms),
dropped iterations < 1 % and the achieved rate ≥ 90 % of the target. A failed step is retried once (the
machine is shared); after a confirmed failure the gap to the last passing rate is bisected. The highest
passing rate is the arm's sustainable requests/s. Around every step the CPU seconds of the picker, the
front Envoy, the upstream and k6 are read from /proc (and the machine's busy time from /proc/stat), so the
picker's CPU seconds per 1,000 requests and the CPU other tenants took are reported with each step.

    .venv/bin/python -m benchmarks.overhead.run [--quick]      (quick ~5-6 min; full: 3 repeats, ~1 h)

Writes benchmarks/results/overhead.json (header + rows + summary) and overhead.md (tables, targets);
`--rerender` rewrites both from the rows of an existing overhead.json.

Modules: `arms.py` (arms, settings, the ext_proc child), `measure.py` (a k6 step and its CPU accounting),
`ladder.py` (one arm: processes, warm-up, the climb), `summary.py` (medians, sustainable rates, targets),
`report.py` (overhead.md), this file (the run and the CLI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/overhead/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import REPO, RESULTS_DIR, VENV_BIN, git, machine_info, tool_version, write_json
from benchmarks.overhead.arms import (
    DEFAULT_MODES,
    ENDPOINT_COUNTS,
    FULL_RATES,
    MODES,
    QUICK_RATES,
    Settings,
    all_arms,
)
from benchmarks.overhead.ladder import run_arm
from benchmarks.overhead.measure import K6_SCRIPT
from benchmarks.overhead.report import write_markdown
from benchmarks.overhead.summary import (
    REFERENCE_RATE,
    TARGET_P50_DELTA_MS,
    TARGET_RPS_RATIO,
    median,
    summarize,
)
from benchmarks.overhead.upstream import InstantUpstream
from epp_lab.envoy_launcher import find_envoy


def _git_state() -> dict[str, Any]:
    """The commit measured, and any uncommitted change under epp/ (others may be editing it)."""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "epp").splitlines() if line.strip()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or None, "epp_uncommitted_files": dirty}


def _envoy_version() -> str | None:
    text = tool_version([find_envoy(), "--version"])
    found = re.search(r"/(\d+\.\d+\.\d+)/", text or "")
    return f"envoy {found.group(1)}" if found else text


# -- main --------------------------------------------------------------------------------------------------
async def main_async(args: argparse.Namespace, settings: Settings) -> None:
    arms = all_arms(args.arms, args.modes, args.endpoints)
    header = machine_info(
        "overhead",
        quick=settings.quick,
        envoy=_envoy_version(),
        k6=tool_version([str(VENV_BIN / "k6"), "version"]),
        settings=asdict(settings),
        arms=[a.label for a in arms],
        k6_script=str(K6_SCRIPT.relative_to(REPO)),
        **_git_state(),
    )
    rows: list[dict] = []
    infos: list[dict] = []
    started = time.monotonic()
    async with InstantUpstream(max(a.endpoints for a in arms)) as upstream:
        upstream.verify()
        print(f"instant upstream: {upstream.count} endpoints on 127.0.0.1 (Envoy pid {upstream.pid})")
        for repeat in range(settings.repeats):
            shift = repeat % len(arms)
            order = arms[shift:] + arms[:shift]  # rotate so no arm always runs first or last
            for arm in order:
                print(f"[repeat {repeat + 1}/{settings.repeats}] {arm.label}", flush=True)
                arm_rows, info = await run_arm(arm, upstream, settings, repeat)
                rows += arm_rows
                infos.append(info)
                print(
                    f"  → sustainable {info['sustainable_rate']} req/s; "
                    f"idle picker {info['idle_picker_cores']} cores"
                )
    header["elapsed_s"] = round(time.monotonic() - started, 1)
    others = [r["other_tenants_cores"] for r in rows]
    header["other_tenants_cores_median"] = median(others)
    header["other_tenants_cores_max"] = max(others) if others else None
    if others and (median(others) or 0) >= 0.1:
        header["busy_machine_note"] = (
            f"Taken on a busy shared machine: other tenants used a median {median(others)} and up to "
            f"{max(others)} of the {os.cpu_count()} cores during the steps; absolute numbers are noisy, "
            "compare arms (run back to back) rather than absolutes."
        )
    summary = summarize(rows, infos)
    out_json = args.out_dir / "overhead.json"
    write_json(out_json, {"header": header, "rows": rows, "arms": infos, "summary": summary})
    write_markdown(args.out_dir / "overhead.md", header, summary, settings)
    print(f"wrote {out_json} and {args.out_dir / 'overhead.md'} ({header['elapsed_s']} s)")
    for t in summary["targets"]:
        if t["evaluated"]:
            print(
                f"  {t['mode']}: epp/no-op rps {t['rps_ratio']} (target ≥ {TARGET_RPS_RATIO}); "
                f"p50 Δ {t['p50_delta_ms']} ms at {REFERENCE_RATE}/s (target ≤ {TARGET_P50_DELTA_MS})"
            )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 s steps, coarse ladder (~5 min)")
    parser.add_argument("--repeats", type=int, help="repeats of the whole arm sequence (default 3; quick 1)")
    parser.add_argument("--step-seconds", type=float, help="duration of each rate step (default 10; quick 4)")
    parser.add_argument("--rates", help="comma-separated rate ladder (requests/s)")
    parser.add_argument("--p99-bound-ms", type=float, default=50.0, help="p99 bound of a passing step (50)")
    parser.add_argument("--arms", default="no-extproc,noop-extproc,epp", help="arms to run (comma-separated)")
    parser.add_argument(
        "--modes",
        help=f"ext_proc modes (comma-separated) of {', '.join(MODES)} (default: all; quick: the first three)",
    )
    parser.add_argument("--endpoints", default=",".join(map(str, ENDPOINT_COUNTS)), help="epp pool sizes")
    parser.add_argument("--scrape-interval", type=float, help="picker metrics scrape interval (its default)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where overhead.json/.md go")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="only rewrite overhead.md from the rows in --out-dir's overhead.json",
    )
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    args.modes = (
        [m for m in args.modes.split(",") if m]
        if args.modes
        else list(DEFAULT_MODES["quick" if args.quick else "full"])
    )
    args.endpoints = [int(n) for n in args.endpoints.split(",") if n]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; expected {', '.join(MODES)}")
    quick = args.quick
    settings = Settings(
        quick=quick,
        rates=[int(r) for r in args.rates.split(",")]
        if args.rates
        else (QUICK_RATES if quick else FULL_RATES),
        step_s=args.step_seconds or (3.0 if quick else 10.0),
        warmup_s=2.0 if quick else 5.0,
        idle_s=2.0 if quick else 5.0,
        repeats=args.repeats or (1 if quick else 3),
        bisect=1 if quick else 2,
        p99_bound_ms=args.p99_bound_ms,
        scrape_interval=args.scrape_interval,
    )
    return args, settings


def rerender(out_dir: Path) -> None:
    """Rewrite overhead.md (and the summary) from the rows of an existing overhead.json."""
    path = out_dir / "overhead.json"
    data = json.loads(path.read_text())
    settings = Settings(**data["header"]["settings"])
    data["summary"] = summarize(data["rows"], data["arms"])
    write_json(path, data)
    write_markdown(out_dir / "overhead.md", data["header"], data["summary"], settings)
    print(f"rewrote {out_dir / 'overhead.md'} from {path}")


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    if args.rerender:
        rerender(args.out_dir)
        return
    try:
        asyncio.run(main_async(args, settings))
    except KeyboardInterrupt:  # every process was stopped by the finally blocks on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
