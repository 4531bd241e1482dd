"""The /metrics page of a simulated replica: Prometheus text with vLLM's metric names, written by hand.

The names and labels are vLLM's, so the picker's scraper reads the simulator as it reads vLLM: queue gauges,
KV-cache usage (new and old name), cache config, LoRA info, prefix-cache and token counters, successful
requests and the TTFT histogram with vLLM's buckets.
"""

from __future__ import annotations

import time

from epp_lab.sim.engine import TTFT_BUCKETS
from epp_lab.sim.profiles import BLOCK_SIZE
from epp_lab.sim.replica import Replica


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(replica: Replica) -> str:
    """Prometheus text exposition with vLLM's metric names, labelled `model_name` like vLLM."""
    e = replica.engine
    st = e.stats
    m = f'model_name="{_label(replica.model)}"'
    running_loras = _label(",".join(e.running_loras()))
    waiting_loras = _label(",".join(e.waiting_loras()))
    kv = e.kv_usage()
    out = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{m}}} {len(e.running)}.0",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{m}}} {len(e.waiting)}.0",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{m}}} {kv!r}",
        "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage (older name). 1 means 100 percent usage.",
        "# TYPE vllm:gpu_cache_usage_perc gauge",
        f"vllm:gpu_cache_usage_perc{{{m}}} {kv!r}",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",num_gpu_blocks="{e.num_gpu_blocks}"}} 1.0',
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        f'vllm:lora_requests_info{{max_lora="{e.max_lora}",running_lora_adapters="{running_loras}",'
        f'waiting_lora_adapters="{waiting_loras}"}} {time.time()!r}',
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{m}}} {st.prefix_queries}.0",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{m}}} {st.cached_tokens}.0",
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{m}}} {st.prompt_tokens}.0",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{m}}} {st.generated_tokens}.0",
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{m}}} {st.preemptions}.0",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{finished_reason="length",{m}}} {st.completed}.0',
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    cumulative = 0
    for le, n in zip(TTFT_BUCKETS, st.ttft_buckets, strict=True):
        cumulative += n
        out.append(f'vllm:time_to_first_token_seconds_bucket{{le="{le!r}",{m}}} {cumulative}.0')
    out.append(f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",{m}}} {st.ttft_count}.0')
    out.append(f"vllm:time_to_first_token_seconds_count{{{m}}} {st.ttft_count}.0")
    out.append(f"vllm:time_to_first_token_seconds_sum{{{m}}} {st.ttft_sum!r}")
    out.append("")
    return "\n".join(out)
