"""The mixed workload of the flow-control benchmark and the simulated fleet it runs on.

Requests: unrelated chat prompts of 500-2,000 tokens (uniform; `epp_lab.loadgen.workloads.no_sharing`,
prompt_tokens=1000) asking for 64-192 streamed output tokens (uniform: requests admitted together do not
all finish together), Poisson arrivals. Each request independently
gets a class and a tenant from the seed:

    class       share   objective header (priority)
    critical    15 %    critical (10)
    standard    35 %    standard (0)
    sheddable   50 %    sheddable (-1)

    tenant      share   x-llm-d-inference-fairness-id
    heavy       80 %    heavy
    light       20 %    light

so at 150 % of the fleet's saturation rate the non-sheddable traffic alone is 75 % of capacity (it fits;
sheddable traffic is the overload), and at 200 % it is 100 % (standard traffic must queue).

Fleet: 4 simulated vLLM replicas of the `h100-llama3-8b` profile in real time (time scale 1: the picker's
reaction time, ~one 50 ms scrape period, weighs what it would on GPUs), 1,200 KV blocks each (19,200 tokens:
~15 requests' worth, so a busy replica fills its KV cache and queues, as vLLM does), SSE tokens in groups of
16. The saturation rate is round-robin's on this fleet (`benchmarks.routing.calibrate`: the highest rate at
which the fleet completes the sequence at >= 90 % of the offered rate), found on a virtual clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epp_lab.loadgen import workloads as generators
from epp_lab.loadgen.workloads import Request
from epp_lab.sim.profiles import DEFAULT_PROFILE

REPLICAS = 4
PROFILE = DEFAULT_PROFILE
TIME_SCALE = 1.0
STREAM_INTERVAL = 16
NUM_GPU_BLOCKS = 1200
PROMPT_TOKENS = 1000  # mean of uniform 500..2000
OUTPUT_TOKENS = (64, 192)  # uniform
CLASSES = (("critical", 0.15, "critical"), ("standard", 0.35, "standard"), ("sheddable", 0.50, "sheddable"))
TENANTS = (("heavy", 0.8), ("light", 0.2))
OBJECTIVES = {"critical": 10, "standard": 0, "sheddable": -1}
FLEET: dict[str, Any] = {"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": NUM_GPU_BLOCKS}


@dataclass(frozen=True, slots=True)
class Mixed:
    """One request of the mixed workload: the generator's request plus its class and tenant."""

    request: Request
    cls: str
    tenant: str

    @property
    def headers(self) -> dict[str, str]:
        return {"x-llm-d-inference-objective": self.cls, "x-llm-d-inference-fairness-id": self.tenant}


def _choose(rng: random.Random, weighted: Sequence[tuple[Any, ...]]) -> str:
    roll, acc = rng.random(), 0.0
    for entry in weighted:
        acc += entry[1]
        if roll < acc:
            return str(entry[0])
    return str(weighted[-1][0])


def mixed(qps: float, count: int, seed: int) -> list[Mixed]:
    """`count` requests at `qps` (real seconds), deterministic given `seed`."""
    base = generators.no_sharing(qps=qps, count=count, prompt_tokens=PROMPT_TOKENS, seed=seed)
    rng = random.Random(seed * 7919 + 1)
    out = []
    for r in base:
        r.body["max_tokens"] = rng.randint(*OUTPUT_TOKENS)
        out.append(Mixed(r, _choose(rng, CLASSES), _choose(rng, TENANTS)))
    return out


def sim_options(seed: int) -> dict[str, Any]:
    return {
        "profile": PROFILE,
        "time_scale": TIME_SCALE,
        "stream_interval": STREAM_INTERVAL,
        "num_gpu_blocks": NUM_GPU_BLOCKS,
        "seed": seed,
    }


def write_requests(path: Path, requests: Sequence[Mixed]) -> None:
    """The sequence as mixed.js loads it."""
    doc = [
        {"at": round(m.request.at, 6), "path": m.request.path, "body": m.request.body, "headers": m.headers,
         "cls": m.cls, "tenant": m.tenant}
        for m in requests
    ]  # fmt: skip
    path.write_text(json.dumps(doc, separators=(",", ":")))


def saturation_qps(seed: int, count: int = 400) -> float:
    """Round-robin's saturation rate of the fleet for this workload (requests per real second)."""
    from benchmarks.routing.calibrate import saturation_qps as calibrate

    def sequence(qps: float) -> list[Request]:
        return [m.request for m in mixed(qps, count, seed)]

    return calibrate(sequence, FLEET) / TIME_SCALE
