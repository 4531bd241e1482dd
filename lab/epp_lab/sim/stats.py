"""The /sim/stats document: counters of each replica and of the whole simulator process, for benchmarks."""

from __future__ import annotations

import time
from typing import Any

from epp_lab.sim.replica import Replica


def replica_stats(replica: Replica, address: str) -> dict[str, Any]:
    """Counters of one replica since start, plus its current queue state."""
    e = replica.engine
    st = e.stats
    return {
        "address": address,
        "port": int(address.rsplit(":", 1)[1]),
        "prompt_tokens": st.prompt_tokens,
        "cached_tokens": st.cached_tokens,
        "prefix_hit_rate": st.cached_tokens / st.prompt_tokens if st.prompt_tokens else 0.0,
        "prefix_queries": st.prefix_queries,
        "generated_tokens": st.generated_tokens,
        "requests_received": st.requests_received,
        "completed": st.completed,
        "aborted": st.aborted,
        "lora_loads": st.lora_loads,
        "preemptions": st.preemptions,
        "evicted_blocks": st.evicted_blocks,
        "steps": st.steps,
        "running": len(e.running),
        "waiting": len(e.waiting),
        "kv_usage": e.kv_usage(),
        "ttft_mean_s": st.ttft_sum / st.ttft_count if st.ttft_count else 0.0,
    }


_SUMMED = (
    "prompt_tokens",
    "cached_tokens",
    "prefix_queries",
    "generated_tokens",
    "requests_received",
    "completed",
    "aborted",
    "lora_loads",
    "preemptions",
    "evicted_blocks",
    "running",
    "waiting",
)


def fleet_stats(per_replica: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"replicas": [...], "total": {...}}` with the counters summed and the fleet's prefix hit rate."""
    total: dict[str, Any] = {k: sum(r[k] for r in per_replica) for k in _SUMMED}
    prompt = total["prompt_tokens"]
    total["prefix_hit_rate"] = total["cached_tokens"] / prompt if prompt else 0.0
    # CPU seconds of the whole simulator process: lets a benchmark check the simulator is not its bottleneck.
    total["process_cpu_s"] = time.process_time()
    return {"replicas": per_replica, "total": total}
