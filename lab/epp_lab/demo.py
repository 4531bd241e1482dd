"""`epp demo`: the same shared-prefix workload through real Envoy, first with Envoy's round-robin, then with
the picker, each against a fresh simulated vLLM fleet; prints a comparison table and writes a PNG plot and
the raw results (JSON).

Defaults are sized for a 2-core machine and about two minutes in all: 4 replicas with a KV cache that holds
a quarter of the workload's shared prefixes each, so round-robin (every replica sees every prefix) thrashes
its caches while prefix-aware routing keeps each group's prefix warm on one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from epp_lab import procs
from epp_lab.envoy_launcher import Envoy, EnvoyOptions, LaunchError, find_envoy
from epp_lab.loadgen import client
from epp_lab.loadgen.workloads import shared_prefix
from epp_lab.procs import ProcessError
from epp_lab.sim.profiles import DEFAULT_PROFILE
from epp_lab.tables import markdown_table


@dataclass(slots=True)
class DemoConfig:
    replicas: int = 4
    qps: float = 9.0  # past round-robin's saturation on this fleet, within the picker's
    duration_s: float = 40.0
    groups: int = 16
    users: int = 8
    system_tokens: int = 3000
    question_tokens: int = 150
    output_tokens: int = 64
    num_gpu_blocks: int = 1200  # 19,200 tokens per replica: ~6 of the 16 prefixes
    profile: str = DEFAULT_PROFILE
    seed: int = 42
    out: str = "out/demo"


ARMS = ("round-robin", "epp")


def _progress(arm: str, total: int) -> Any:
    last = [0.0]

    def report(done: int, _total: int, errors: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            bar = "#" * int(30 * done / total)
            print(f"\r  {arm:<12} [{bar:<30}] {done}/{total} done, {errors} errors", end="", file=sys.stderr)
            if done == total:
                print(file=sys.stderr)

    return report


async def _fleet_stats(addresses: list[str]) -> dict[str, float]:
    """The fleet's prefix-cache hit rate as the simulated servers counted it (Σ cached / Σ prompt tokens);
    one replica's /sim/stats reports the totals of its whole process."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{addresses[0]}/sim/stats") as response,
    ):
        total = (await response.json())["total"]
    prompt, cached = total.get("prompt_tokens", 0), total.get("cached_tokens", 0)
    return {"hit_rate": cached / prompt if prompt else 0.0}


async def run_arm(arm: str, cfg: DemoConfig, requests: list[Any]) -> dict[str, Any]:
    sim = procs.sim(cfg.replicas, profile=cfg.profile, num_gpu_blocks=cfg.num_gpu_blocks, seed=cfg.seed)
    async with sim:
        addresses = sim.info["addresses"]
        if arm == "round-robin":
            options = EnvoyOptions(shape="direct", pool=addresses, lb_policy="ROUND_ROBIN")
            return await _drive(arm, options, requests, addresses)
        async with procs.picker(addresses, extra=["--seed", str(cfg.seed)]) as picker:
            options = EnvoyOptions(shape="gateway", epp_port=picker.info["extproc"], pool=addresses)
            return await _drive(arm, options, requests, addresses)


async def _drive(
    arm: str, options: EnvoyOptions, requests: list[Any], addresses: list[str]
) -> dict[str, Any]:
    async with Envoy(options) as envoy:
        results, wall = await client.run(envoy.url, requests, _progress(arm, len(requests)))
    summary: dict[str, Any] = dict(client.summarize(results, wall))
    summary.update(await _fleet_stats(addresses))
    summary["arm"] = arm
    summary["ttft_s"] = [r.ttft_s for r in results if r.ttft_s >= 0]
    return summary


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ["arm", "TTFT p50", "TTFT p90", "out tok/s", "req/s", "hit rate", "errors"]
    cells = [
        [r["arm"], f"{r['ttft_p50_s']:.3f} s", f"{r['ttft_p90_s']:.3f} s", f"{r['output_tok_s']:.1f}",
         f"{r['req_s']:.2f}", f"{r['hit_rate']:.1%}", r["errors"]]
        for r in rows
    ]  # fmt: skip
    lines = [markdown_table(columns, cells, ["l"] + ["r"] * 6).rstrip("\n")]
    if len(rows) == 2 and rows[1]["ttft_p90_s"] > 0:
        base, ours = rows
        lines.append(
            f"\nepp vs round-robin: TTFT p90 {ours['ttft_p90_s'] / base['ttft_p90_s']:.2f}x, "
            f"throughput {ours['output_tok_s'] / max(base['output_tok_s'], 1e-9):.2f}x"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        values = sorted(r["ttft_s"])
        if values:
            left.plot(values, [i / len(values) for i in range(1, len(values) + 1)], label=r["arm"])
    left.set_xlabel("time to first token (s)")
    left.set_ylabel("fraction of requests")
    left.set_title("TTFT distribution (CDF)")
    left.grid(alpha=0.3)
    left.legend()
    names = [r["arm"] for r in rows]
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["ttft_p50_s"] for r in rows], width=0.4, label="TTFT p50")
    right.bar([i + 0.2 for i in x], [r["ttft_p90_s"] for r in rows], width=0.4, label="TTFT p90")
    right.set_xticks(list(x), names)
    right.set_ylabel("seconds")
    right.set_title("TTFT (lower is better)")
    right.legend()
    fig.suptitle("Shared-prefix workload through Envoy: round-robin vs epp (simulated vLLM fleet)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    count = max(1, math.ceil(cfg.qps * cfg.duration_s))
    requests = shared_prefix(
        qps=cfg.qps, count=count, groups=cfg.groups, users=cfg.users, system_tokens=cfg.system_tokens,
        question_tokens=cfg.question_tokens, output_tokens=cfg.output_tokens, seed=cfg.seed,
    )  # fmt: skip
    print(
        f"epp demo: {count} requests ({cfg.groups} groups sharing {cfg.system_tokens}-token prefixes, "
        f"{cfg.qps:g} req/s for {cfg.duration_s:g}s) on {cfg.replicas} simulated vLLM replicas, "
        "through Envoy",
        file=sys.stderr,
    )
    rows = []
    for arm in ARMS:
        rows.append(await run_arm(arm, cfg, requests))
    return rows


def main(argv: list[str] | None = None) -> int:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="epp demo",
        description="Round-robin vs the picker on a simulated vLLM fleet, through real Envoy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = DemoConfig(**vars(args))
    try:
        find_envoy()
    except LaunchError as err:
        print(f"epp demo: {err}", file=sys.stderr)
        return 1
    try:
        rows = asyncio.run(demo(cfg))
    except ProcessError as err:  # LaunchError included
        print(f"epp demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nepp demo: interrupted; all processes stopped", file=sys.stderr)
        return 130
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "arms": rows}, indent=1))
    _plot(rows, out / "ttft.png")
    print(_table(rows))
    print(f"\nwrote {out / 'results.json'} and {out / 'ttft.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
