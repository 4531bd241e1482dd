"""What flow control adds to a request it does not hold: `Director.decide` with flow control off vs on.

    .venv/bin/python -m benchmarks.flowcontrol.bench_admission [--samples N] [--endpoints N] [--tokens N]

The setting of `benchmarks/bench_scheduler.py`'s `Director.decide` cell (its helpers: a full prefix index,
shared-prefix prompts, a moving window of in-flight requests that got their first token), with metrics
scraped "just now" and a pool below saturation (no queue, KV 10-50 %), so flow control admits every request
at once: the difference is the admission step (the
gate's pass over the candidates, the queue check) and the outcome metric. The two directors alternate in
blocks of 50 requests so machine noise hits both alike; p50 / p90 / mean in microseconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson
from prometheus_client import CollectorRegistry

from benchmarks import bench_scheduler as bench
from epp.config import load_config
from epp.datalayer.endpoints import EndpointPool, MetricsSnapshot
from epp.observability.metrics import RequestMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.registry import PluginContext, build_scheduler

BLOCK = 50


def director(count: int, flow: bool, seed: int, capacity: int) -> tuple[Director, EndpointPool]:
    rng = random.Random(seed)
    config = load_config(None, {"scheduling": {"seed": seed}, "flow_control": {"enabled": flow}})
    endpoints = bench.make_endpoints(count, capacity, rng)
    for e in endpoints:  # below saturation: flow control admits every request at once
        m = e.metrics
        e.metrics = MetricsSnapshot(
            waiting=0.0, running=m.running, kv_usage=rng.uniform(0.1, 0.5),
            running_loras=m.running_loras, waiting_loras=m.waiting_loras, max_lora=m.max_lora,
            block_size=m.block_size, num_blocks=m.num_blocks, updated_at=time.monotonic(),
        )  # fmt: skip
    pool = EndpointPool(endpoints)
    scheduler = build_scheduler(PluginContext(config, pool, random.Random(seed)), time_plugins=True)
    bench.fill_index(bench.prefix_scorer(scheduler).index, endpoints, capacity, rng)
    return Director(config, pool, scheduler, RequestMetrics(CollectorRegistry())), pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000, help="timed requests per arm")
    parser.add_argument("--endpoints", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    capacity = bench.QUICK.capacity_blocks
    arms: dict[str, Any] = {}
    for name, flow in (("off", False), ("on", True)):
        d, pool = director(args.endpoints, flow, args.seed, capacity)
        workload = bench.Workload(args.tokens, bench.QUICK.groups, random.Random(args.seed))
        window = bench.InflightWindow(2 * args.endpoints, lambda decision, d=d: d.finished(decision, 200))
        arms[name] = {"director": d, "pool": pool, "workload": workload, "window": window, "ns": []}

    def one(arm: dict[str, Any], timed: bool) -> None:
        prefix, rest, model = arm["workload"].next()
        messages = [{"role": "system", "content": prefix}, {"role": "user", "content": rest}]
        body = orjson.dumps({"model": model, "max_tokens": 256, "stream": True, "messages": messages})
        headers = {":path": "/v1/chat/completions", "x-request-id": f"r{arm['workload'].serial}"}
        now = time.monotonic()
        for e in arm["pool"]:  # a scrape "just now" (outside the timing)
            e.metrics.updated_at = now
        start = time.perf_counter_ns()
        decision = arm["director"].decide(headers, body)
        if timed:
            arm["ns"].append(time.perf_counter_ns() - start)
        arm["director"].dispatched(decision)
        arm["director"].response_started(decision)  # its first token (the window ends it later)
        arm["window"].started(decision)

    for arm in arms.values():
        for _ in range(bench.QUICK.warmup):
            one(arm, timed=False)
    while len(arms["on"]["ns"]) < args.samples:
        for arm in arms.values():
            for _ in range(BLOCK):
                one(arm, timed=True)
    print(f"Director.decide, {args.endpoints} endpoints x {args.tokens} tokens, {args.samples} per arm (µs)")
    for name, arm in arms.items():
        stats = bench.summarize(arm["ns"])
        print(f"  flow control {name:<3}  p50 {stats['p50_us']:7.1f}  p90 {stats['p90_us']:7.1f}  "
              f"mean {stats['mean_us']:7.1f}")  # fmt: skip
    flow = arms["on"]["director"].flow
    assert flow is not None and flow.size == 0, "flow control held requests: the pool was saturated"
    return 0


if __name__ == "__main__":
    sys.exit(main())
