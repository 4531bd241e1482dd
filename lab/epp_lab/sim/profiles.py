"""Named latency profiles: how long a simulated GPU takes to prefill, decode and load a LoRA adapter.

The engine's cost model (see `epp_lab.sim.engine`) is, per scheduling step:

    step = decode_base_s                                   # weights read once per forward pass
         + decode_per_seq_s   * running sequences          # per-sequence sampling / scheduling work
         + decode_per_ctx_token_s * Σ context tokens       # KV-cache reads of attention (memory bound)
         + [prefill_overhead_s if the step prefills anything]
         + prefill_per_token_s * uncached prompt tokens in the step
         + lora_load_s * adapters loaded in the step

So a lone request sees TTFT ≈ prefill_overhead_s + decode_base_s + prefill_per_token_s x uncached tokens and a
time per output token of ≈ decode_base_s at batch 1, growing with batch size and context.

Sources (public, approximate; we round to the middle of the published ranges, then keep the numbers inside the
ranges of docs/benchmarks.md so that a benchmark's results are comparable across runs of this project):
- Lambda Labs, "vLLM benchmark" report (github.com/LambdaLabsML/vllm-benchmark, 2024): Llama 3.1 8B/70B with
  vLLM ≥ 0.6 on H100-80GB-SXM and A100-80GB-SXM; H100 ≈ 2x A100 in both throughput and latency.
- Ori, "Benchmarking Llama 3.1 8B Instruct on Nvidia H100 and A100 chips with vLLM" (blog.ori.co, 2024):
  TTFT of tens of ms for short prompts, 10-15 ms inter-token latency at low concurrency on H100.
- Microsoft Azure HPC blog, "Performance of Llama 3.1 8B AI inference using vLLM on ND-H100-v5" (2025):
  ~12k output tok/s at high concurrency on one H100, i.e. decode steps of ~20-40 ms at batch 256.
- vLLM blog, "vLLM v0.6.0: 2.7x throughput improvement" (2024): TPOT of Llama 3 8B/70B on H100.
- Roofline cross-checks: Llama-3-8B holds 128 KiB of KV per token (32 layers x 8 KV heads x 128 dims x K,V x
  bf16); an H100 reads ~3.35 TB/s, so each context token costs ~0.04 µs per decode step; 16 GB of weights put
  a floor of ~5 ms under every step. 70B holds 320 KiB per token, spread over 4 GPUs with TP4.
- LoRA: loading a rank-16 adapter of an 8B model from the CPU cache is tens of milliseconds (vLLM's
  `--max-cpu-loras` cache, GIE/llm-d LoRA-affinity discussions); we charge it to the step that first runs it.
- KV blocks: (0.9 x HBM - weights - activations) / (KV bytes per token x 16), e.g. (72 - 16 - 4) GB / 2 MiB
  ≈ 25,000 blocks for 8B on one H100 80 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SIZE = 16
"""Tokens per KV block (vLLM's default `--block-size`)."""


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Costs of one simulated replica, in simulated seconds. The module docstring states the model."""

    name: str
    prefill_overhead_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    lora_load_s: float
    num_gpu_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Per-step token budget (vLLM's chunked prefill): decode tokens count 1 each; prefills are cut to fit."""


PROFILES: dict[str, LatencyProfile] = {
    p.name: p
    for p in (
        # Llama-3.1-8B-Instruct, bf16, one H100 80 GB SXM.
        LatencyProfile(
            name="h100-llama3-8b",
            prefill_overhead_s=0.030,
            prefill_per_token_s=0.00015,
            decode_base_s=0.010,
            decode_per_seq_s=0.00006,
            decode_per_ctx_token_s=0.04e-6,
            lora_load_s=0.030,
            num_gpu_blocks=25_000,
        ),
        # The same H100 at the fast end of what is published for prefill: compute bound, 8B parameters cost
        # ~16 GFLOP per prompt token, so ~50 % of the H100's ~990 dense bf16 TFLOP/s gives ~30k tokens/s;
        # vLLM measurements land at 10-20k tokens/s for long prompts. 0.05 ms/token = 20k tokens/s, a third
        # of the default's 0.15 ms (the slow end): a cache hit saves a third as much, a queue costs the same.
        # For checking that routing conclusions hold at both ends (benchmarks: `--profile`).
        LatencyProfile(
            name="h100-llama3-8b-fast-prefill",
            prefill_overhead_s=0.025,
            prefill_per_token_s=0.00005,
            decode_base_s=0.010,
            decode_per_seq_s=0.00006,
            decode_per_ctx_token_s=0.04e-6,
            lora_load_s=0.030,
            num_gpu_blocks=25_000,
        ),
        # Same model on one A100 80 GB SXM: ~2x slower compute, 2.0 vs 3.35 TB/s memory bandwidth.
        LatencyProfile(
            name="a100-llama3-8b",
            prefill_overhead_s=0.040,
            prefill_per_token_s=0.00030,
            decode_base_s=0.015,
            decode_per_seq_s=0.00009,
            decode_per_ctx_token_s=0.065e-6,
            lora_load_s=0.045,
            num_gpu_blocks=25_000,
        ),
        # Llama-3.1-70B-Instruct, bf16, four H100 80 GB with tensor parallelism 4.
        LatencyProfile(
            name="h100x4-llama3-70b",
            prefill_overhead_s=0.040,
            prefill_per_token_s=0.00030,
            decode_base_s=0.022,
            decode_per_seq_s=0.00008,
            decode_per_ctx_token_s=0.025e-6,
            lora_load_s=0.050,
            num_gpu_blocks=28_000,
        ),
    )
}

DEFAULT_PROFILE = "h100-llama3-8b"


def get_profile(name: str) -> LatencyProfile:
    """The profile called `name`; `ValueError` naming the known profiles otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
