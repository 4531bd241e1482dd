"""Round-robin's saturation point per workload, found on a virtual clock in a second or two.

The simulated fleet's engines (`epp_lab.sim.engine.Engine`, the very code `epp sim` runs) are stepped here
on a float clock, with requests dealt round-robin as Envoy's ROUND_ROBIN deals them (strict rotation), so the
QPS ladder of the real benchmark can be placed before any process starts. The real runs then confirm it:
round-robin's measured completion rate at the 125 % point should sit near the capacity found here.

Saturation QPS = the highest offered rate at which the round-robin fleet keeps up: it completes the
sequence (the same request count and shape as a real run, Poisson arrivals) at >= 90 % of the offered
rate, counted from the first arrival to the last completion. Beyond it the queues grow for the rest of the
run. (The rate a backlogged fleet completes is not used: with LoRA slots a backlog lets the engines pick
requests whose adapter is resident, which open-loop traffic does not allow.) Everything here is in
simulated seconds; divide by the simulator's time scale for real seconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from epp_lab.loadgen.workloads import Request
from epp_lab.sim.config import DEFAULT_MODEL, EngineConfig
from epp_lab.sim.engine import Batch, Engine, SimRequest, block_hashes, prompt_token_count
from epp_lab.sim.openai import DEFAULT_MAX_TOKENS, chat_prompt
from epp_lab.sim.profiles import DEFAULT_PROFILE, get_profile

Router = Callable[[int, SimRequest, list[Engine]], int]
KEEP_UP = 0.9


def round_robin(i: int, request: SimRequest, engines: list[Engine]) -> int:
    return i % len(engines)


@dataclass(slots=True)
class VirtualResult:
    ttft: list[float]
    finish: list[float]
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    lora_loads: int

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def to_sim_request(i: int, request: Request, base_model: str) -> SimRequest:
    body = request.body
    text = chat_prompt(body["messages"]) if "messages" in body else str(body["prompt"])
    model = str(body.get("model", base_model))
    return SimRequest(
        request_id=str(i),
        model=model,
        lora=None if model == base_model else model,
        prompt_tokens=prompt_token_count(text),
        max_tokens=int(body.get("max_tokens") or DEFAULT_MAX_TOKENS),
        block_hashes=block_hashes(text, model),
    )


def simulate(
    requests: Sequence[Request],
    fleet: dict[str, Any],
    arrivals: Sequence[float] | None = None,
    router: Router = round_robin,
) -> VirtualResult:
    """Run `requests` (at `arrivals`, default their own offsets) through a virtual fleet shaped by `fleet`
    (the keys of a workload's `fleet` in workloads.py: replicas, profile or one profile per replica
    (`profiles`), num_gpu_blocks, max_num_seqs, max_lora)."""
    profiles = fleet.get("profiles") or [fleet.get("profile", DEFAULT_PROFILE)] * fleet.get("replicas", 4)
    engines = [
        Engine(
            EngineConfig(
                profile=get_profile(profile),
                num_gpu_blocks=fleet.get("num_gpu_blocks"),
                max_num_seqs=fleet.get("max_num_seqs"),
                max_lora=fleet.get("max_lora", 4),
            )
        )
        for profile in profiles
    ]
    base_model = fleet.get("model", DEFAULT_MODEL)
    sims = [to_sim_request(i, r, base_model) for i, r in enumerate(requests)]
    times = list(arrivals) if arrivals is not None else [r.at for r in requests]
    batches: list[Batch | None] = [None] * len(engines)
    steps: list[tuple[float, int]] = []  # (end time, engine) of the running steps

    def start(k: int, now: float) -> None:
        batch = engines[k].schedule()
        if batch.scheduled:
            batches[k] = batch
            heapq.heappush(steps, (now + batch.duration, k))

    nxt = 0
    while nxt < len(sims) or steps:
        if nxt < len(sims) and (not steps or times[nxt] <= steps[0][0]):
            now = times[nxt]
            k = router(nxt, sims[nxt], engines)
            engines[k].submit(sims[nxt], now)
            nxt += 1
            if batches[k] is None:
                start(k, now)
            continue
        end, k = heapq.heappop(steps)
        batch = batches[k]
        assert batch is not None
        batches[k] = None
        engines[k].finish(batch, end)
        if engines[k].has_work():
            start(k, end)
    return VirtualResult(
        ttft=[r.ttft if r.ttft is not None else float("nan") for r in sims],
        finish=[r.finish_time if r.finish_time is not None else float("nan") for r in sims],
        output_tokens=sum(e.stats.generated_tokens for e in engines),
        prompt_tokens=sum(e.stats.prompt_tokens for e in engines),
        cached_tokens=sum(e.stats.cached_tokens for e in engines),
        lora_loads=sum(e.stats.lora_loads for e in engines),
    )


def completion_rate(result: VirtualResult, arrivals: Sequence[float]) -> float:
    """Requests completed per simulated second, from the first arrival to the last completion."""
    done = [t for t in result.finish if t == t]
    span = max(done) - min(arrivals) if done else 0.0
    return len(done) / span if span > 0 else 0.0


def saturation_qps(
    workload: Callable[[float], Sequence[Request]],
    fleet: dict[str, Any],
    router: Router = round_robin,
    keep_up: float = KEEP_UP,
    iterations: int = 12,
) -> float:
    """The highest QPS (per simulated second) at which the fleet completes the sequence at >= `keep_up` x
    the offered rate; `workload(qps)` makes the sequence. Bracketed by doubling, then bisected."""

    def sustained(qps: float) -> bool:
        requests = workload(qps)
        arrivals = [r.at for r in requests]
        offered = len(requests) / (max(arrivals) - min(arrivals)) if len(requests) > 1 else qps
        return completion_rate(simulate(requests, fleet, router=router), arrivals) >= keep_up * offered

    lo, hi = 0.0, 1.0
    while sustained(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if sustained(mid):
            lo = mid
        else:
            hi = mid
    return lo
