"""`parse_metrics` on /metrics pages recorded from a real vLLM (tests/fixtures/realengine)."""

from __future__ import annotations

from pathlib import Path

from epp.datalayer.scrape.extract import parse_metrics

FIXTURES = Path(__file__).parents[2] / "fixtures" / "realengine"


def test_busy_page_with_three_lora_series() -> None:
    result = parse_metrics((FIXTURES / "metrics_lora_busy.txt").read_text(), "vllm")
    assert result.ok and not result.problems
    m = result.metrics
    assert (m.waiting, m.running) == (8, 16)
    assert 0 < m.kv_usage < 0.01
    assert (m.block_size, m.num_blocks) == (128, 2048)  # CPU block size; 256 MiB of KV cache
    # Three series; the newest (largest timestamp) lists lora-1 and lora-3, the third adapter waits unnamed.
    assert m.running_loras == m.waiting_loras == frozenset({"lora-1", "lora-3"})
    assert m.max_lora == 2


def test_after_unload_the_newest_of_six_series_is_current() -> None:
    result = parse_metrics((FIXTURES / "metrics_after_unload.txt").read_text(), "vllm")
    assert result.ok and not result.problems
    m = result.metrics
    assert (m.waiting, m.running, m.kv_usage) == (0, 0, 0)
    # Series never expire: six label sets ever seen; the newest (all requests done) names no adapter.
    assert m.running_loras == m.waiting_loras == frozenset() and m.max_lora == 2
