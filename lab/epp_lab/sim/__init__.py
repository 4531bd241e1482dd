"""A simulated vLLM fleet: OpenAI-compatible replicas whose latency comes from a model, not a GPU.

Faithful where routing matters (continuous batching, a content-addressed prefix cache with LRU eviction, KV
pressure and preemption, LoRA slots and load delays, vLLM's /metrics names) and cheap enough that it is never
a benchmark's bottleneck on 2 cores.

Modules, from the core outwards:
- `profiles`: named latency profiles (`h100-llama3-8b` default, `a100-llama3-8b`, `h100x4-llama3-70b`), with
  sources and the step-cost formula.
- `config`: `FleetConfig` (every setting of a fleet, validated; the CLI is built from its fields),
  `EngineConfig` (what one engine needs, derived from it) and `DEFAULT_MODEL`.
- `engine`: the synchronous scheduler / KV cache / LoRA core on a virtual clock (unit-testable, no asyncio).
- `replica`: the asyncio driver that runs one engine in scaled real time and wakes HTTP handlers.
- `openai`: request validation, chat prompt rendering and response documents (no HTTP).
- `sse`: the streamed response writer; `metrics_text`: the vLLM /metrics page; `stats`: /sim/stats.
- `handlers`: the aiohttp app of one replica; `fleet`: `SimFleet` (N replicas, sockets, lifecycle).
- `cli`: `epp sim ...` (`main(argv)`); `selfbench`: the CPU-cost measurement below.

In-process use:

    async with SimFleet(FleetConfig(replicas=4, time_scale=0.1)) as fleet:
        fleet.addresses   # ["127.0.0.1:PORT", ...]
        fleet.stats()     # {"replicas": [...], "total": {...}}, as GET /sim/stats

CPU cost (measured with `python -m epp.sim.selfbench --requests 1000 --max-tokens 128`, now
`python -m epp_lab.sim.selfbench`: the fleet runs as its own process with 4 replicas at time scale 0.25, 64
concurrent streaming clients in another process send ~1,000-token prompts; the simulator's
`time.process_time()` is read from /sim/stats before and after; 2-core VM shared with other work, so figures
are upper bounds):
- `--stream-interval 1` (one SSE event per token, the default): 4.8 CPU s per 1,000 requests, i.e. ~0.4 ms per
  request plus ~0.035 ms per output token (0.038 CPU s per 1,000 output tokens).
- `--stream-interval 4`: 2.3 CPU s per 1,000 requests (0.018 CPU s per 1,000 output tokens).
The engine itself costs ~2.3 us per generated token and ~30 us to hash a 1,000-token prompt; the rest is
aiohttp and SSE writes. So a fleet streaming 10,000 tokens/s needs ~0.4 core, or ~0.2 with stream interval 4.
"""

from epp_lab.sim.config import DEFAULT_MODEL, EngineConfig, FleetConfig
from epp_lab.sim.engine import Engine, SimRequest
from epp_lab.sim.fleet import SimFleet
from epp_lab.sim.profiles import PROFILES, LatencyProfile, get_profile

__all__ = [
    "DEFAULT_MODEL",
    "PROFILES",
    "Engine",
    "EngineConfig",
    "FleetConfig",
    "LatencyProfile",
    "SimFleet",
    "SimRequest",
    "get_profile",
]
