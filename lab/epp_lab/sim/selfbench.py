"""Measure the simulator's own CPU cost: `python -m epp_lab.sim.selfbench [--requests N] [--concurrency C]`.

Starts the fleet as a separate process (`epp_lab.sim.cli`, via `epp_lab.procs`), drives it with N streaming
/v1/completions requests from C concurrent aiohttp clients in this process, and reads the simulator
process's CPU time from `/sim/stats` (`total.process_cpu_s`, i.e. `time.process_time()` there) before and
after. Prints CPU seconds per 1,000 requests and per 1,000 output tokens, and the fraction of one core the
simulator used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from epp_lab import procs


async def _run(args: argparse.Namespace) -> dict[str, float]:
    sim = procs.sim(args.replicas, time_scale=args.time_scale, stream_interval=args.stream_interval)
    async with sim:
        addresses = sim.info["addresses"]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def cpu() -> float:
                async with http.get(f"http://{addresses[0]}/sim/stats") as resp:
                    return float((await resp.json())["total"]["process_cpu_s"])

            todo = iter(range(args.requests))
            tokens = 0

            async def client() -> None:
                nonlocal tokens
                for i in todo:
                    # 8 shared prefixes of ~1,000 tokens, a distinct question each: realistic hashing work.
                    prompt = f"system {i % 8}: " + "context " * 500 + f"question {i}"
                    body = {"prompt": prompt, "max_tokens": args.max_tokens, "stream": True}
                    url = f"http://{addresses[i % len(addresses)]}/v1/completions"
                    async with http.post(url, json=body) as resp:
                        async for _ in resp.content.iter_any():
                            pass
                    tokens += args.max_tokens

            cpu0, t0 = await cpu(), time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            cpu1, wall = await cpu(), time.perf_counter() - t0
    used = cpu1 - cpu0
    return {
        "requests": args.requests,
        "output_tokens": tokens,
        "wall_s": wall,
        "sim_cpu_s": used,
        "cpu_s_per_1k_requests": used / args.requests * 1000,
        "cpu_s_per_1k_output_tokens": used / tokens * 1000,
        "sim_core_fraction": used / wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epp_lab.sim.selfbench", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="streaming requests to send")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas")
    p.add_argument("--time-scale", type=float, default=0.25, help="simulator time scale")
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per SSE event")
    result = asyncio.run(_run(p.parse_args(argv)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
