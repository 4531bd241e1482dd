"""The workloads of the routing benchmark and the simulated fleet each runs on.

Request sequences come from `epp_lab.loadgen.workloads` (deterministic given the seed; Poisson arrivals at the
requested QPS); this module only fixes their shapes and sizes the fleet so that routing matters:

* shared-prefix: 16 groups x 8 users, 3,000-token system prefixes, 150-token questions, 128 output tokens.
  A replica holds 1,200 KV blocks (19,200 tokens): about 5 of the 16 prefixes (less its working set), the
  fleet of 4 holds all of them. Round-robin shows every prefix to every replica and thrashes their caches.
* multi-turn: 23 conversations (odd, so that Envoy's strict round-robin rotation does not map a
  conversation onto one replica by accident), 500-token system prompt, 300-token user turns, 150-token
  answers in the history, 128 output tokens; ~9 turns each. 2,000 blocks per replica (32,000 tokens): the
  grown histories fit in the fleet, not in one replica.
* multi-lora: 15 LoRA adapters with 60/30/10 % popularity over three tiers (3 / 4-5 / the rest), 1,000-token
  unshared prompts, 128 output tokens; each replica has 4 adapter slots (`--max-lora 4`, fewer than the
  15 adapters, 16 in the fleet) and pays the profile's load time for a non-resident adapter; a request whose
  adapter cannot get a slot waits (vLLM's behaviour).
* no-sharing: unrelated prompts of 1,000-4,000 tokens (uniform), 128 output tokens, 1,200 blocks per replica:
  nothing to gain from affinity; the picker must balance load as well as least-request does.

Held out (the default weights were not tuned on these; `epp-latency` was developed on the virtual lab with
them, see routing.md):

* rag: a 300-token shared system prompt + the top-4 of a 200-document corpus (400 tokens each, Zipf 1.1
  popularity, most relevant first) + a 60-token question, 128 output tokens; 2,000 blocks per replica. Little
  is shared beyond the system prompt: locality buys little and an imbalance costs.
* bursty: the shared-prefix shape with on/off arrivals at 1.8x and 0.2x the mean rate, 40 arrivals per phase:
  scraped metrics lag the bursts.
* mixed-length: 80 % short chats (100-300 tokens, 64 out) and 20 % long documents (3,000-9,000 tokens, 256
  out), unrelated; 2,000 blocks per replica.
* hetero: the mixed-length requests on a heterogeneous fleet: two H100 replicas and two A100 replicas (about
  half the speed): a balancer that assumes equal replicas overloads the slow ones.

Every fleet: 4 replicas of the `h100-llama3-8b` profile, run at a time scale (`TIME_SCALE`) faster than real
time so that a run of a few hundred requests fits the quick mode's budget, and SSE tokens grouped by
`STREAM_INTERVAL` to keep the simulator cheap. The time scale divides every model latency equally, so it
changes no ratio between arms; it makes the routers' own overheads (and the picker's 50 ms metrics scrape)
count relatively more, which can only disadvantage the routers that do more work per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epp_lab.loadgen import workloads as generators
from epp_lab.loadgen.workloads import Request
from epp_lab.sim.config import DEFAULT_MODEL
from epp_lab.sim.profiles import DEFAULT_PROFILE

PROFILE = DEFAULT_PROFILE
REPLICAS = 4
TIME_SCALE = 0.25
"""Real seconds per simulated second (0.25: the simulated fleet runs 4x faster than the profile's GPU).
`run.py --time-scale 1` runs the profile in real time (4x longer runs)."""
STREAM_INTERVAL = 16
"""Tokens per SSE event (first and last are always sent at once)."""
LORA_ADAPTERS = generators.lora_adapters(15)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    generator: str  # key of epp_lab.loadgen.workloads.WORKLOADS
    params: dict[str, Any]
    fleet: dict[str, Any]  # `epp sim` options (and the virtual calibration's fleet)
    count: int  # requests per run
    tags: tuple[str, ...] = field(default=())

    def requests(self, qps: float, seed: int) -> list[Request]:
        """The request sequence at `qps` (requests per real second) for `seed`: the same for every arm."""
        make = generators.WORKLOADS[self.generator]
        return make(qps=qps, count=self.count, seed=seed, **self.params)  # type: ignore[operator]

    def sim_options(self, seed: int, time_scale: float = TIME_SCALE) -> dict[str, Any]:
        """Keyword options for `epp_lab.procs.sim` (the fleet of one run)."""
        options: dict[str, Any] = {
            # A mixed fleet: one profile per replica (the simulator takes them comma-separated).
            "profile": ",".join(self.fleet.get("profiles") or [self.fleet.get("profile", PROFILE)]),
            "time_scale": time_scale,
            "stream_interval": STREAM_INTERVAL,
            "seed": seed,
        }
        for key in ("num_gpu_blocks", "max_num_seqs", "max_lora"):
            if key in self.fleet:
                options[key] = self.fleet[key]
        if self.fleet.get("lora_adapters"):
            options["lora_adapters"] = ",".join(self.fleet["lora_adapters"])
        return options


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="shared-prefix",
            generator="shared-prefix",
            params={
                "groups": 16,
                "users": 8,
                "system_tokens": 3000,
                "question_tokens": 150,
                "output_tokens": 128,
                "model": DEFAULT_MODEL,
            },
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 1200},
            count=400,
        ),
        Workload(
            name="multi-turn",
            generator="multi-turn",
            params={
                "conversations": 23,
                "turn_tokens": 300,
                "answer_tokens": 150,
                "output_tokens": 128,
                "system_tokens": 500,
                "model": DEFAULT_MODEL,
            },
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 2000},
            count=200,
        ),
        Workload(
            name="multi-lora",
            generator="multi-lora",
            params={"adapters": len(LORA_ADAPTERS), "prompt_tokens": 1000, "output_tokens": 128},
            fleet={"replicas": REPLICAS, "profile": PROFILE, "max_lora": 4, "lora_adapters": LORA_ADAPTERS},
            count=200,
        ),
        Workload(
            name="rag",
            generator="rag",
            params={
                "documents": 200,
                "top_k": 4,
                "doc_tokens": 400,
                "system_tokens": 300,
                "question_tokens": 60,
                "output_tokens": 128,
                "model": DEFAULT_MODEL,
            },
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 2000},
            count=300,
            tags=("held-out",),
        ),
        Workload(
            name="bursty",
            generator="bursty",
            params={
                "groups": 16,
                "users": 8,
                "system_tokens": 3000,
                "question_tokens": 150,
                "output_tokens": 128,
                "on": 1.8,
                "off": 0.2,
                "phase_requests": 40,
                "model": DEFAULT_MODEL,
            },
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 1200},
            count=400,
            tags=("held-out",),
        ),
        Workload(
            name="mixed-length",
            generator="mixed-length",
            params={"short_tokens": 200, "long_tokens": 6000, "long_share": 0.2, "model": DEFAULT_MODEL},
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 2000},
            count=300,
            tags=("held-out",),
        ),
        Workload(
            name="hetero",
            generator="mixed-length",
            params={"short_tokens": 200, "long_tokens": 6000, "long_share": 0.2, "model": DEFAULT_MODEL},
            fleet={
                "replicas": REPLICAS,
                "profiles": ["h100-llama3-8b", "h100-llama3-8b", "a100-llama3-8b", "a100-llama3-8b"],
                "num_gpu_blocks": 2000,
            },
            count=300,
            tags=("held-out", "heterogeneous"),
        ),
        Workload(
            name="no-sharing",
            generator="no-sharing",
            params={"prompt_tokens": 2000, "output_tokens": 128, "model": DEFAULT_MODEL},
            fleet={"replicas": REPLICAS, "profile": PROFILE, "num_gpu_blocks": 1200},
            count=200,
        ),
    )
}


def write_requests(path: Path, requests: list[Request]) -> None:
    """The sequence as the k6 script loads it (arrival offsets in seconds after the start)."""
    doc = [{"at": round(r.at, 6), "path": r.path, "body": r.body} for r in requests]
    path.write_text(json.dumps(doc, separators=(",", ":")))
