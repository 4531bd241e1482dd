"""Deterministic OpenAI workloads and a streaming client that measures TTFT (demo, benchmarks)."""
