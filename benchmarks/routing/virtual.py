"""A policy lab on a virtual clock: the simulated fleet's engines routed by the picker's own scheduler.

For developing and tuning scorers in seconds, on any workload, immune to a busy machine; never the evidence
(the real benchmark, `run.py`, is: real Envoy, real k6, real processes). What runs here is real code: the
simulator's `Engine` (the very code `epp sim` runs, stepped on a float clock as `calibrate.py` does), the
picker's request parsing and its scheduler and plugins built from a config (`epp.scheduling.registry`). What
is modelled: the scrape (every endpoint's metrics copied from its engine every `scrape_s`, at a random phase,
so they lag as real scrapes do), the request lifecycle the director would report (dispatch → `pre_request`;
first token → `response_started` with the simulated time since dispatch; in-flight released at the first
token, as `response.follow: first-byte` does), and zero network time.

    .venv/bin/python -m benchmarks.routing.virtual --workloads rag,bursty --policies epp,epp-latency

Policies: `round-robin`, `least-request` (Envoy's: power of two choices on active requests), and any picker
config: `epp` (defaults) or a file benchmarks/routing/configs/<name>.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from benchmarks.routing import calibrate
from benchmarks.routing.workloads import WORKLOADS, Workload
from epp.config import load_config
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.requestcontrol.parsing import parse_request
from epp.requestcontrol.routing import ModelRouter
from epp.scheduling.interfaces import (
    CycleState,
    PreRequest,
    ResponseComplete,
    ResponseStarted,
    SchedulingRequest,
)
from epp.scheduling.registry import PluginContext, build_scheduler
from epp_lab.sim.config import DEFAULT_MODEL, EngineConfig
from epp_lab.sim.engine import Batch, Engine, SimRequest
from epp_lab.sim.profiles import DEFAULT_PROFILE, get_profile

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(slots=True)
class Outcome:
    ttft: list[float]
    e2e: list[float]
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    lora_loads: int
    span: float
    # (replica, predicted TTFT, observed TTFT) of every streamed request a `latency` scorer predicted
    predictions: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ttft = sorted(t for t in self.ttft if t == t)
        done = [t for t in self.e2e if t == t]

        def q(p: float) -> float:
            return ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else float("nan")

        return {
            "ttft_p50": round(q(0.5), 4),
            "ttft_p90": round(q(0.9), 4),
            "ttft_p99": round(q(0.99), 4),
            "e2e_p50": round(statistics.median(done), 3) if done else float("nan"),
            "tok_s": round(self.output_tokens / self.span, 1) if self.span else 0.0,
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 3) if self.prompt_tokens else 0.0,
            "lora_loads": self.lora_loads,
            "done": len(done),
        }


class Policy:
    predictions: list[tuple[int, float, float]]

    def route(self, i: int, body: dict[str, Any], sim: SimRequest, now: float) -> int:
        raise NotImplementedError

    def scrape(self, k: int, engine: Engine, now: float) -> None:
        pass

    def first_token(self, i: int, now: float) -> None:
        pass

    def finished(self, i: int, now: float) -> None:
        pass


class RoundRobin(Policy):
    def __init__(self, n: int) -> None:
        self.n = n

    def route(self, i: int, body: dict[str, Any], sim: SimRequest, now: float) -> int:
        return i % self.n


class LeastRequest(Policy):
    """Envoy LEAST_REQUEST: two random choices, the one with fewer active requests."""

    def __init__(self, n: int, seed: int) -> None:
        self.active = [0] * n
        self.where: dict[int, int] = {}
        self.rng = random.Random(seed)

    def route(self, i: int, body: dict[str, Any], sim: SimRequest, now: float) -> int:
        a, b = self.rng.sample(range(len(self.active)), 2)
        k = a if self.active[a] <= self.active[b] else b
        self.active[k] += 1
        self.where[i] = k
        return k

    def finished(self, i: int, now: float) -> None:
        self.active[self.where.pop(i)] -= 1


class Picker(Policy):
    """The picker's scheduler and plugins over endpoints whose metrics are scraped from the engines."""

    def __init__(self, config: dict[str, Any], n: int, seed: int) -> None:
        addresses = [f"10.0.0.{k + 1}:8000" for k in range(n)]
        cfg = load_config(None, {**config, "pool": {"endpoints": addresses}, "scheduling": {
            **config.get("scheduling", {}), "seed": seed}})  # fmt: skip
        self.endpoints = [Endpoint(a) for a in addresses]
        self.pool = EndpointPool(self.endpoints)
        self.scheduler = build_scheduler(PluginContext(cfg, self.pool, random.Random(seed)))
        self.router = ModelRouter(cfg, random.Random(seed))
        self.pre = self.scheduler.hooks(PreRequest)
        self.started = self.scheduler.hooks(ResponseStarted)
        self.complete = self.scheduler.hooks(ResponseComplete)
        self.live: dict[int, tuple[SchedulingRequest, CycleState, Endpoint, float]] = {}
        self.predictions = []

    def route(self, i: int, body: dict[str, Any], sim: SimRequest, now: float) -> int:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        parsed = parse_request(orjson.dumps(body), path)
        target = self.router.resolve(parsed.model)
        request = SchedulingRequest(
            request_id=str(i), model=parsed.model, target_model=target.model, prompt=parsed.prompt,
            prompt_tokens=parsed.prompt_tokens, max_tokens=parsed.max_tokens,
            lora_adapter=target.model if target.lora else None, stream=parsed.stream,
        )  # fmt: skip
        state = CycleState()
        endpoint = self.scheduler.schedule(request, state, self.endpoints).endpoints[0]
        endpoint.acquire(request.estimated_tokens)
        for hook in self.pre:
            hook.pre_request(request, state, endpoint)
        self.live[i] = (request, state, endpoint, now)
        return self.endpoints.index(endpoint)

    def scrape(self, k: int, engine: Engine, now: float) -> None:
        self.endpoints[k].metrics = MetricsSnapshot(
            waiting=float(len(engine.waiting)),
            running=float(len(engine.running)),
            kv_usage=engine.kv_usage(),
            running_loras=frozenset(engine.running_loras()),
            waiting_loras=frozenset(engine.waiting_loras()),
            max_lora=engine.max_lora,
            served_models=SERVED,
            block_size=16,
            num_blocks=engine.num_gpu_blocks,
            updated_at=now if now > 0 else 1e-9,
        )

    def first_token(self, i: int, now: float) -> None:
        request, state, endpoint, sent = self.live.pop(i)
        p = state.get("latency")
        if p is not None and endpoint.address in p.addresses:
            predicted = p.ttft[p.addresses.index(endpoint.address)]
            self.predictions.append((self.endpoints.index(endpoint), predicted, now - sent))
        for hook in self.started:
            hook.response_started(request, state, endpoint, now - sent)
        endpoint.release(request.estimated_tokens)  # response.follow: first-byte
        for done in self.complete:
            done.response_complete(request, state, endpoint, 200)


SERVED = frozenset({DEFAULT_MODEL})  # the `model_name` label the simulator's metrics carry


def policy(name: str, n: int, seed: int) -> Policy:
    if name == "round-robin":
        return RoundRobin(n)
    if name == "least-request":
        return LeastRequest(n, seed)
    if name == "epp":
        return Picker({}, n, seed)
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"unknown policy {name!r}: no {path}")
    return Picker(yaml.safe_load(path.read_text()) or {}, n, seed)


def run(workload: Workload, qps: float, name: str, seed: int = 7, scrape_s: float = 0.05) -> Outcome:
    """Route `workload` at `qps` (per simulated second) with policy `name` on a virtual fleet."""
    fleet = workload.fleet
    profiles = fleet.get("profiles") or [fleet.get("profile", "h100-llama3-8b")] * fleet.get("replicas", 4)
    engines = [
        Engine(EngineConfig(profile=get_profile(p), num_gpu_blocks=fleet.get("num_gpu_blocks"),
                            max_num_seqs=fleet.get("max_num_seqs"), max_lora=fleet.get("max_lora", 4)))
        for p in profiles
    ]  # fmt: skip
    n = len(engines)
    router = policy(name, n, seed)
    requests = workload.requests(qps, seed)
    base_model = DEFAULT_MODEL
    sims = [calibrate.to_sim_request(i, r, base_model) for i, r in enumerate(requests)]
    index = {id(s): i for i, s in enumerate(sims)}
    batches: list[Batch | None] = [None] * n
    events: list[tuple[float, int, int]] = []  # (time, kind, engine): 0 step end, 1 scrape
    rng = random.Random(seed)
    for k in range(n):
        heapq.heappush(events, (rng.uniform(0, scrape_s), 1, k))

    def start(k: int, now: float) -> None:
        batch = engines[k].schedule()
        if batch.scheduled:
            batches[k] = batch
            heapq.heappush(events, (now + batch.duration, 0, k))

    nxt = 0
    last = 0.0
    while nxt < len(sims) or any(b is not None for b in batches):
        if nxt < len(sims) and (not events or requests[nxt].at <= events[0][0]):
            now = requests[nxt].at
            k = router.route(nxt, requests[nxt].body, sims[nxt], now)
            engines[k].submit(sims[nxt], now)
            nxt += 1
            if batches[k] is None:
                start(k, now)
            continue
        now, kind, k = heapq.heappop(events)
        if kind == 1:
            router.scrape(k, engines[k], now)
            if nxt < len(sims) or any(b is not None for b in batches):
                heapq.heappush(events, (now + scrape_s, 1, k))
            continue
        batch = batches[k]
        assert batch is not None
        batches[k] = None
        for req in engines[k].finish(batch, now):
            i = index[id(req)]
            if req.first_token_time == now and req.generated == 1:
                router.first_token(i, now)
            if req.finish_time is not None:
                router.finished(i, now)
                last = max(last, now)
        if engines[k].has_work():
            start(k, now)
    span = last - requests[0].at if requests else 0.0
    return Outcome(
        ttft=[s.ttft if s.ttft is not None else math.nan for s in sims],
        e2e=[s.finish_time - s.arrival if s.finish_time is not None else math.nan for s in sims],
        output_tokens=sum(e.stats.generated_tokens for e in engines),
        prompt_tokens=sum(e.stats.prompt_tokens for e in engines),
        cached_tokens=sum(e.stats.cached_tokens for e in engines),
        lora_loads=sum(e.stats.lora_loads for e in engines),
        span=span,
        predictions=getattr(router, "predictions", []),
    )


def with_profile(workload: Workload, profile: str) -> Workload:
    """`workload` on replicas of `profile` (in a mixed fleet: those of the default profile)."""
    get_profile(profile)  # fails early, naming the known ones
    fleet = dict(workload.fleet)
    if fleet.get("profiles"):
        fleet["profiles"] = [profile if p == DEFAULT_PROFILE else p for p in fleet["profiles"]]
    else:
        fleet["profile"] = profile
    return dataclasses.replace(workload, fleet=fleet)


def saturation(workload: Workload) -> float:
    """Round-robin's saturation QPS (per simulated second), as the real benchmark calibrates it."""
    return calibrate.saturation_qps(lambda qps: workload.requests(qps, 7), workload.fleet)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default="round-robin,least-request,epp")
    parser.add_argument("--loads", default="0.5,0.75,1.0", help="fractions of round-robin's saturation QPS")
    parser.add_argument("--seeds", default="7", help="comma-separated seeds; medians are printed")
    parser.add_argument(
        "--profile",
        default="",
        help="run every replica on this latency profile instead of the workload's (e.g. "
        "h100-llama3-8b-fast-prefill); in a mixed fleet, it replaces the default profile's replicas",
    )
    parser.add_argument(
        "--prediction-errors",
        type=Path,
        default=None,
        help="write the latency scorer's prediction error per replica (predicted vs observed TTFT of every "
        "streamed request, first seed) to this .md, with a .png beside it",
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    errors: list[tuple[str, float, str, list[tuple[int, float, float]]]] = []
    for wname in args.workloads.split(","):
        workload = WORKLOADS[wname]
        if args.profile:
            workload = with_profile(workload, args.profile)
        sat = saturation(workload)
        print(f"\n## {wname}: round-robin saturates at {sat:.2f} req/s (simulated)", flush=True)
        for load in (float(x) for x in args.loads.split(",")):
            for pname in args.policies.split(","):
                outcomes = [run(workload, sat * load, pname, seed) for seed in seeds]
                rows = [o.summary() for o in outcomes]
                if outcomes[0].predictions:
                    errors.append((wname, load, pname, outcomes[0].predictions))
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                print(
                    f"  {load:>4.0%} {pname:<22} " + " ".join(f"{k} {v:g}" for k, v in med.items()),
                    flush=True,
                )
    if args.prediction_errors is not None:
        write_prediction_errors(
            args.prediction_errors, errors, " ".join(sys.argv[1:] if argv is None else argv)
        )


def write_prediction_errors(
    out: Path, errors: list[tuple[str, float, str, list[tuple[int, float, float]]]], command: str
) -> None:
    """Per workload, load, policy and replica: requests, mean predicted and observed TTFT, bias (observed −
    predicted, mean) and the mean and p90 absolute error; and a scatter of predicted vs observed."""
    import datetime as dt
    import platform

    lines = [
        "# Latency scorer: predicted vs observed time to first token (virtual lab)",
        "",
        f"`.venv/bin/python -m benchmarks.routing.virtual {command}` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC ({platform.node() or 'host'}, "
        f"{platform.machine()}). Virtual clock: the simulator's engines and the picker's own scheduler; "
        "first seed; seconds of simulated time. Bias > 0: the model predicted too little.",
        "",
        "| workload | load | policy | replica | requests | predicted mean | observed mean | bias | "
        "abs error mean | abs error p90 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wname, load, pname, predictions in errors:
        for k in sorted({r for r, _, _ in predictions}):
            pairs = [(pr, ob) for r, pr, ob in predictions if r == k]
            abs_err = sorted(abs(ob - pr) for pr, ob in pairs)
            predicted = statistics.fmean(pr for pr, _ in pairs)
            observed = statistics.fmean(ob for _, ob in pairs)
            lines.append(
                f"| {wname} | {load:.0%} | {pname} | {k} | {len(pairs)} | {predicted:.3f} | {observed:.3f} | "
                f"{observed - predicted:+.3f} | {statistics.fmean(abs_err):.3f} | "
                f"{abs_err[min(len(abs_err) - 1, int(0.9 * len(abs_err)))]:.3f} |"
            )
    out.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, load, pn, pr) for w, load, pn, pr in errors]
    cols = min(4, len(panels)) or 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, (wname, load, pname, predictions) in zip(axes.flat, panels, strict=False):
        top = max(max(pr, ob) for _, pr, ob in predictions)
        for k in sorted({r for r, _, _ in predictions}):
            xs = [pr for r, pr, _ in predictions if r == k]
            ys = [ob for r, _, ob in predictions if r == k]
            ax.scatter(xs, ys, s=6, alpha=0.6, label=f"replica {k}")
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
        ax.set_title(f"{wname} @{load:.0%} ({pname})", fontsize=9)
        ax.set_xlabel("predicted TTFT (s)", fontsize=8)
        ax.set_ylabel("observed TTFT (s)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)


if __name__ == "__main__":
    sys.exit(main())
