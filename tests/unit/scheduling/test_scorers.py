"""Load and LoRA scorers: each formula from the plugin docstrings, checked on hand-computed values."""

from __future__ import annotations

import pytest

from epp.datalayer.endpoints import Endpoint, MetricsSnapshot
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.scorers.inflight import InflightScorer
from epp.scheduling.plugins.scorers.kv_cache import KVCacheScorer
from epp.scheduling.plugins.scorers.lora_affinity import LoraAffinityScorer
from epp.scheduling.plugins.scorers.queue import QueueScorer
from epp.scheduling.scoring import spread_scores


def endpoint(
    index: int,
    *,
    waiting: float = 0,
    running: float = 0,
    kv: float = 0.0,
    running_loras: tuple[str, ...] = (),
    waiting_loras: tuple[str, ...] = (),
    max_lora: int = 0,
    served: tuple[str, ...] = (),
    inflight: int = 0,
    inflight_tokens: int = 0,
) -> Endpoint:
    e = Endpoint(
        f"10.0.0.{index}:8000",
        metrics=MetricsSnapshot(
            waiting=waiting,
            running=running,
            kv_usage=kv,
            running_loras=frozenset(running_loras),
            waiting_loras=frozenset(waiting_loras),
            max_lora=max_lora,
            served_models=frozenset(served),
            updated_at=1.0,
        ),
    )
    e.inflight_requests = inflight
    e.inflight_tokens = inflight_tokens
    return e


def request(target: str = "base", lora_adapter: str | None = None) -> SchedulingRequest:
    return SchedulingRequest("r1", model=target, target_model=target, lora_adapter=lora_adapter)


# -- queue ---------------------------------------------------------------------------------------------


def test_queue_score_is_spread_of_waiting_over_candidates() -> None:
    candidates = [endpoint(1, waiting=2), endpoint(2, waiting=10), endpoint(3, waiting=4)]
    # (maxQ − q) / (maxQ − minQ) with maxQ = 10, minQ = 2
    assert QueueScorer().score(request(), CycleState(), candidates) == pytest.approx([1.0, 0.0, 0.75])


def test_queue_score_all_equal_is_one_for_everyone() -> None:
    candidates = [endpoint(i, waiting=7) for i in range(4)]
    assert QueueScorer().score(request(), CycleState(), candidates) == [1.0, 1.0, 1.0, 1.0]


def test_queue_score_single_candidate_is_one() -> None:
    assert QueueScorer().score(request(), CycleState(), [endpoint(1, waiting=50)]) == [1.0]


def test_queue_score_ignores_running_requests() -> None:
    candidates = [endpoint(1, waiting=0, running=100), endpoint(2, waiting=1, running=0)]
    assert QueueScorer().score(request(), CycleState(), candidates) == [1.0, 0.0]


def test_spread_scores_is_relative_not_absolute() -> None:
    # Same differences, shifted: same scores.
    assert spread_scores([100, 104, 102]) == pytest.approx(spread_scores([0, 4, 2]))
    assert spread_scores([0, 4, 2]) == pytest.approx([1.0, 0.0, 0.5])


# -- kv-cache --------------------------------------------------------------------------------------------


def test_kv_score_is_one_minus_usage() -> None:
    candidates = [endpoint(1, kv=0.0), endpoint(2, kv=0.25), endpoint(3, kv=0.99), endpoint(4, kv=1.0)]
    assert KVCacheScorer().score(request(), CycleState(), candidates) == pytest.approx([1.0, 0.75, 0.01, 0.0])


def test_kv_score_is_absolute_even_when_all_equal() -> None:
    # Unlike the queue scorer, equal usage does not mean a perfect score.
    candidates = [endpoint(1, kv=0.5), endpoint(2, kv=0.5)]
    assert KVCacheScorer().score(request(), CycleState(), candidates) == pytest.approx([0.5, 0.5])


# -- lora-affinity ---------------------------------------------------------------------------------------


def lora_pool() -> list[Endpoint]:
    return [
        endpoint(1, running_loras=("sql",), max_lora=2),  # running: 1.0
        endpoint(2, running_loras=("chat",), max_lora=2),  # a slot free (1 of 2): 0.8
        endpoint(3, running_loras=("chat",), waiting_loras=("sql",), max_lora=2),  # full, sql waiting: 0.6
        endpoint(4, running_loras=("chat", "math"), max_lora=2),  # full, not there: 0
        endpoint(5),  # reports no LoRA at all (max_lora 0): 0
    ]


def test_lora_scores_running_free_slot_waiting_none() -> None:
    scores = LoraAffinityScorer(0.8, 0.6).score(request("sql", lora_adapter="sql"), CycleState(), lora_pool())
    assert scores == pytest.approx([1.0, 0.8, 0.6, 0.0, 0.0])


def test_lora_adapter_detected_from_running_metrics_without_config() -> None:
    # lora_adapter is None (the config did not mark it), but a candidate reports "sql" running.
    scores = LoraAffinityScorer(0.8, 0.6).score(request("sql"), CycleState(), lora_pool())
    assert scores == pytest.approx([1.0, 0.8, 0.6, 0.0, 0.0])


def test_lora_adapter_detected_from_waiting_metrics_only() -> None:
    candidates = [endpoint(1, waiting_loras=("sql",), running_loras=("a", "b"), max_lora=2), endpoint(2)]
    assert LoraAffinityScorer(0.8, 0.6).score(request("sql"), CycleState(), candidates) == pytest.approx(
        [0.6, 0.0]
    )


def test_lora_base_model_request_has_no_preference() -> None:
    scores = LoraAffinityScorer(0.8, 0.6).score(request("meta-llama/Llama-3.1-8B"), CycleState(), lora_pool())
    assert scores == [1.0] * 5


def test_lora_cold_adapter_no_server_runs_goes_to_a_free_slot() -> None:
    # Nobody runs or queues "sql" and the config does not name it, but the servers say they serve "base"
    # and hold adapters: "sql" is an adapter and needs a free slot.
    pool = [
        endpoint(1, running_loras=("a", "b"), max_lora=2, served=("base",)),  # full: 0
        endpoint(2, running_loras=("a",), max_lora=2, served=("base",)),  # a free slot: 0.8
    ]
    assert LoraAffinityScorer(0.8, 0.6).score(request("sql"), CycleState(), pool) == pytest.approx([0.0, 0.8])
    # The base model itself is no adapter.
    assert LoraAffinityScorer(0.8, 0.6).score(request("base"), CycleState(), pool) == [1.0, 1.0]


def test_lora_unknown_target_is_no_adapter_without_lora_or_model_names() -> None:
    no_lora = [endpoint(1, served=("base",)), endpoint(2, served=("base",))]  # max_lora 0: LoRA off
    unnamed = [endpoint(1, running_loras=("a", "b"), max_lora=2), endpoint(2, max_lora=2)]  # no model_name
    for pool in (no_lora, unnamed):
        assert LoraAffinityScorer(0.8, 0.6).score(request("other"), CycleState(), pool) == [1.0, 1.0]


def test_lora_free_slot_counts_waiting_adapters_as_occupying() -> None:
    # running + waiting = 2 adapters = max_lora: no free slot.
    full = endpoint(1, running_loras=("a",), waiting_loras=("b",), max_lora=2)
    assert LoraAffinityScorer(0.8, 0.6).score(request("sql", "sql"), CycleState(), [full]) == [0.0]


def test_lora_custom_free_slot_and_waiting_values() -> None:
    scores = LoraAffinityScorer(0.5, 0.25).score(
        request("sql", lora_adapter="sql"), CycleState(), lora_pool()
    )
    assert scores == pytest.approx([1.0, 0.5, 0.25, 0.0, 0.0])


# -- inflight --------------------------------------------------------------------------------------------


def inflight_pool() -> list[Endpoint]:
    return [
        endpoint(1, inflight=0, inflight_tokens=1000),
        endpoint(2, inflight=4, inflight_tokens=0),
        endpoint(3, inflight=2, inflight_tokens=500),
    ]


def test_inflight_requests_mode() -> None:
    scores = InflightScorer("requests").score(request(), CycleState(), inflight_pool())
    assert scores == pytest.approx([1.0, 0.0, 0.5])


def test_inflight_tokens_mode() -> None:
    scores = InflightScorer("tokens").score(request(), CycleState(), inflight_pool())
    assert scores == pytest.approx([0.0, 1.0, 0.5])


def test_inflight_both_mode_is_mean_of_the_two() -> None:
    scores = InflightScorer("both").score(request(), CycleState(), inflight_pool())
    assert scores == pytest.approx([0.5, 0.5, 0.5])
    lopsided = [endpoint(1, inflight=0, inflight_tokens=0), endpoint(2, inflight=2, inflight_tokens=100)]
    assert InflightScorer("both").score(request(), CycleState(), lopsided) == pytest.approx([1.0, 0.0])


def test_inflight_idle_pool_scores_one() -> None:
    idle = [endpoint(i) for i in range(3)]
    for mode in ("requests", "tokens", "both"):
        assert InflightScorer(mode).score(request(), CycleState(), idle) == [1.0, 1.0, 1.0]


def test_inflight_counts_follow_acquire_and_release() -> None:
    a, b = endpoint(1), endpoint(2)
    a.acquire(300)
    assert InflightScorer("both").score(request(), CycleState(), [a, b]) == pytest.approx([0.0, 1.0])
    a.release(300)
    assert InflightScorer("both").score(request(), CycleState(), [a, b]) == [1.0, 1.0]


def test_scores_stay_aligned_with_candidate_order() -> None:
    candidates = [endpoint(1, waiting=9, kv=0.9), endpoint(2, waiting=0, kv=0.1)]
    reversed_candidates = candidates[::-1]
    assert QueueScorer().score(request(), CycleState(), reversed_candidates) == [1.0, 0.0]
    assert KVCacheScorer().score(request(), CycleState(), reversed_candidates) == pytest.approx([0.9, 0.1])
