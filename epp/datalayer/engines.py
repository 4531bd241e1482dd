"""Where each model-server engine reports the signals the scheduler reads: metric names as data.

Adding an engine is adding an entry here (and its name to `epp.config.Engine`); `scrape.extract` reads any
entry the same way. What each engine calls the signals:

    vLLM           waiting vllm:num_requests_waiting, running vllm:num_requests_running, KV use
                   vllm:kv_cache_usage_perc (V0: vllm:gpu_cache_usage_perc), cache shape the labels
                   block_size and num_gpu_blocks of vllm:cache_config_info, LoRA vllm:lora_requests_info
    SGLang         sglang:num_queue_reqs, sglang:num_running_reqs, sglang:token_usage,
                   sglang:cache_config_info{page_size, num_pages}
    trtllm-serve   trtllm_num_requests_waiting, trtllm_num_requests_running, trtllm_kv_cache_utilization,
                   trtllm_kv_cache_tokens_per_block, trtllm_kv_cache_max_blocks
    Triton TRT-LLM nv_trt_llm_request_metrics{request_type=waiting|scheduled},
                   nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction|tokens_per|max}
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.config import ENGINES


@dataclass(frozen=True, slots=True)
class Source:
    """One place a signal is read from: the series of metric `name` (only those whose label `where[0]`
    equals `where[1]`, if given). The value is the sample's value or, with `label`, that label's integer
    value (info-style gauges such as `vllm:cache_config_info`)."""

    name: str
    where: tuple[str, str] | None = None
    label: str | None = None

    def __str__(self) -> str:
        return self.name if self.where is None else f'{self.name}{{{self.where[0]}="{self.where[1]}"}}'


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """An engine's sources. waiting/running are summed over series; KV usage is the max over series of the
    first source that has samples (newer names first); cache shape is the max over series; `lora_info` is a
    vLLM-style info gauge whose newest series (largest value, a timestamp) lists the adapters."""

    waiting: Source
    running: Source
    kv_usage: tuple[Source, ...]
    block_size: Source | None = None
    num_blocks: Source | None = None
    lora_info: Source | None = None

    def metric_names(self) -> tuple[str, ...]:
        sources = [
            self.waiting,
            self.running,
            *self.kv_usage,
            self.block_size,
            self.num_blocks,
            self.lora_info,
        ]
        return tuple(dict.fromkeys(s.name for s in sources if s is not None))


_TRITON_REQUESTS = "nv_trt_llm_request_metrics"
_TRITON_BLOCKS = "nv_trt_llm_kv_cache_block_metrics"

ENGINE_METRICS: dict[str, EngineMetrics] = {
    "vllm": EngineMetrics(
        waiting=Source("vllm:num_requests_waiting"),
        running=Source("vllm:num_requests_running"),
        kv_usage=(Source("vllm:kv_cache_usage_perc"), Source("vllm:gpu_cache_usage_perc")),  # V0 name last
        block_size=Source("vllm:cache_config_info", label="block_size"),
        num_blocks=Source("vllm:cache_config_info", label="num_gpu_blocks"),
        lora_info=Source("vllm:lora_requests_info"),
    ),
    "sglang": EngineMetrics(
        waiting=Source("sglang:num_queue_reqs"),
        running=Source("sglang:num_running_reqs"),
        kv_usage=(Source("sglang:token_usage"),),
        block_size=Source("sglang:cache_config_info", label="page_size"),
        num_blocks=Source("sglang:cache_config_info", label="num_pages"),
    ),
    "trtllm-serve": EngineMetrics(
        waiting=Source("trtllm_num_requests_waiting"),
        running=Source("trtllm_num_requests_running"),
        kv_usage=(Source("trtllm_kv_cache_utilization"),),
        block_size=Source("trtllm_kv_cache_tokens_per_block"),
        num_blocks=Source("trtllm_kv_cache_max_blocks"),
    ),
    "triton-trtllm": EngineMetrics(
        waiting=Source(_TRITON_REQUESTS, where=("request_type", "waiting")),
        running=Source(_TRITON_REQUESTS, where=("request_type", "scheduled")),
        kv_usage=(Source(_TRITON_BLOCKS, where=("kv_cache_block_type", "fraction")),),
        block_size=Source(_TRITON_BLOCKS, where=("kv_cache_block_type", "tokens_per")),
        num_blocks=Source(_TRITON_BLOCKS, where=("kv_cache_block_type", "max")),
    ),
}

if set(ENGINE_METRICS) != set(ENGINES):  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"engine tables disagree: {sorted(ENGINE_METRICS)} vs epp.config.ENGINES {ENGINES}")
