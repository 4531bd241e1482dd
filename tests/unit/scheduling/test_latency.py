"""The latency-predicting scorer: its online model (learns each endpoint's rates, robust to outliers, priors
before data), the prediction's parts (uncached tokens in absolute terms, the backlog the picker built, LoRA
loads, KV pressure), the choice (minimum cost, ties spread, eviction cost), objectives and the 429 for
sheddable requests nobody can serve in time, the lifecycle bookkeeping and what explain shows."""

from __future__ import annotations

import random

import pytest

from epp.config import load_config
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.errors import Rejection
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.latency.model import LatencyModel, Rates, features
from epp.scheduling.plugins.latency.scorer import LatencyParams, LatencyScorer
from epp.scheduling.registry import PluginContext, build_scheduler

BLOCK = 64  # characters per prefix block = 16 tokens


def blocks(tag: str, count: int) -> str:
    return "".join(f"{tag}-block-{i:04d}-".ljust(BLOCK, "x") for i in range(count))


def endpoint(i: int, **metrics: float) -> Endpoint:
    return Endpoint(f"10.0.0.{i}:8000", metrics=MetricsSnapshot(updated_at=1.0, **metrics))  # type: ignore[arg-type]


def request(prompt: str, *, stream: bool = True, **fields: object) -> SchedulingRequest:
    return SchedulingRequest(
        "r",
        "m",
        "m",
        prompt=prompt,
        prompt_tokens=len(prompt) // 4,
        stream=stream,
        **fields,  # type: ignore[arg-type]
    )


# -- the model -------------------------------------------------------------------------------------------


def test_model_learns_each_endpoints_rates_and_shrugs_off_outliers() -> None:
    rng = random.Random(1)
    model = LatencyModel()
    truth = {"fast": (0.03, 0.12, 0.004, 0.03, 0.2, 1.0), "slow": (0.045, 0.3, 0.008, 0.045, 0.4, 1.5)}
    for _ in range(800):
        address = rng.choice(list(truth))
        x = features(
            rng.uniform(0, 8000),
            rng.randint(0, 60),
            rng.random() < 0.1,
            rng.uniform(0.5, 1.1),
            rng.random() < 0.05,
        )
        y = sum(t * v for t, v in zip(truth[address], x, strict=True)) + rng.gauss(0, 0.01)
        if rng.random() < 0.02:
            y += 2.0  # a stalled request
        model.observe(address, x, y)
    for address, theta in truth.items():
        learned = model.theta(address)
        assert learned[1] == pytest.approx(theta[1], rel=0.1)  # prefill rate: the term that matters most
        assert learned[0] == pytest.approx(theta[0], abs=0.015)


def test_before_any_observation_an_endpoint_is_predicted_from_the_prior_then_the_pool() -> None:
    model = LatencyModel(Rates(overhead_s=0.05, s_per_ktoken=0.2, s_per_10_running=0.0, lora_load_s=0.0))
    x = features(2000, 0, False)
    assert model.predict("new", x) == pytest.approx(0.05 + 0.2 * 2)
    for _ in range(200):
        model.observe("seen", x, 1.0)
    assert model.predict("seen", x) == pytest.approx(1.0, rel=0.05)
    assert model.predict("new", x) == pytest.approx(1.0, rel=0.05)  # the pool learned too


def test_rates_never_go_negative() -> None:
    model = LatencyModel()
    for _ in range(300):
        model.observe("e", features(5000, 50, True, 1.0), 0.0001)
    assert all(v >= 0 for v in model.theta("e"))


# -- the prediction and the choice --------------------------------------------------------------------------


def scorer(**params: object) -> LatencyScorer:
    """A scorer on the predicted cost alone (locality 0) unless a test asks for the blend."""
    return LatencyScorer(LatencyParams(**{"locality": 0.0, **params}))  # type: ignore[arg-type]


def test_uncached_tokens_are_absolute_so_a_long_shared_prefix_wins_over_a_short_one() -> None:
    s = scorer(tie_s=0.0)
    a, b = endpoint(1), endpoint(2)
    shared = blocks("doc", 100)  # 1,600 tokens
    s.prefix.index.record(a.address, s.prefix._state(request(shared), CycleState()).hashes[:100])
    s.prefix.index.record(b.address, s.prefix._state(request(shared), CycleState()).hashes[:10])
    state = CycleState()
    scores = s.score(request(shared + blocks("question", 5)), state, [a, b])
    p = state["latency"]
    assert p.uncached == [80.0, 80.0 + 90 * 16]
    assert scores[0] == 1.0 and scores[1] < 1.0


def test_the_backlog_the_picker_builds_moves_the_next_request_elsewhere() -> None:
    s = scorer(tie_s=0.0)
    a, b = endpoint(1), endpoint(2)
    prompt = blocks("p", 200)  # 3,200 tokens, cached nowhere
    first = request(prompt)
    state = CycleState()
    s.score(first, state, [a, b])
    s.pre_request(first, state, a)  # sent to a, not answered yet
    second, state2 = request(blocks("q", 200)), CycleState()
    scores = s.score(second, state2, [a, b])
    assert state2["latency"].backlog[0] == pytest.approx(3200) and scores[1] > scores[0]
    s.response_started(first, state, a, 0.5)  # a answered: its backlog is gone
    state3 = CycleState()
    s.score(request(blocks("r", 200)), state3, [a, b])
    assert state3["latency"].backlog[0] == 0.0


def test_an_adapter_that_must_be_loaded_costs_its_load_time() -> None:
    s = scorer(tie_s=0.0)
    warm = endpoint(1, running_loras=frozenset({"sql"}), max_lora=2)  # type: ignore[arg-type]
    cold = endpoint(2, max_lora=2)
    state = CycleState()
    scores = s.score(request(blocks("p", 4), lora_adapter="sql"), state, [warm, cold])
    assert state["latency"].ttft[1] - state["latency"].ttft[0] == pytest.approx(0.03)
    assert scores[0] > scores[1]


def test_an_adapter_just_sent_counts_as_resident_before_the_scrape_shows_it() -> None:
    # vLLM reports running and waiting adapters, not idle resident ones: the picker remembers what it sent.
    s = scorer(tie_s=0.0)
    a, b = endpoint(1, max_lora=2), endpoint(2, max_lora=2)
    first = CycleState()
    s.score(request(blocks("p", 4), lora_adapter="sql"), first, [a, b])
    s.pre_request(request(blocks("p", 4), lora_adapter="sql"), first, a)
    s.response_started(request(blocks("p", 4), lora_adapter="sql"), first, a, 0.2)  # done with it, idle
    state = CycleState()
    s.score(request(blocks("q", 4), lora_adapter="sql"), state, [a, b])
    assert state["latency"].lora == [False, True]


def test_a_request_waits_for_an_adapter_slot_when_every_slot_runs_another_adapter() -> None:
    s = scorer(tie_s=0.0)
    full = endpoint(1, running_loras=frozenset({"a", "b"}), max_lora=2)  # type: ignore[arg-type]
    free = endpoint(2, running_loras=frozenset({"a"}), max_lora=2, running=5)  # type: ignore[arg-type]
    state = CycleState()
    scores = s.score(request(blocks("p", 4), lora_adapter="sql"), state, [full, free])
    assert state["latency"].slot_wait == [True, False]
    assert state["latency"].ttft[0] - state["latency"].ttft[1] == pytest.approx(1.0 - 0.005 * 0.5)
    assert scores[1] > scores[0]


def test_a_cold_adapter_nobody_named_is_recognised_by_the_served_model_names() -> None:
    s = scorer(tie_s=0.0)
    served = frozenset({"base"})
    full = endpoint(1, running_loras=frozenset({"a", "b"}), max_lora=2, served_models=served)  # type: ignore[arg-type]
    free = endpoint(2, max_lora=2, served_models=served)  # type: ignore[arg-type]
    state = CycleState()
    cold = SchedulingRequest("r", "sql", "sql", prompt=blocks("p", 4), prompt_tokens=64, stream=True)
    s.score(cold, state, [full, free])
    assert state["latency"].slot_wait == [True, False]


def test_locality_blends_the_share_of_the_prompt_held_into_the_score() -> None:
    shared = blocks("doc", 8)
    for locality, warm_wins in ((0.0, False), (1.0, True)):
        s = scorer(tie_s=0.0, locality=locality)
        warm, idle = endpoint(1, running=40), endpoint(2)
        s.prefix.index.record(warm.address, s.prefix._state(request(shared), CycleState()).hashes)
        scores = s.score(request(shared), CycleState(), [warm, idle])
        assert (scores[0] > scores[1]) is warm_wins, (locality, scores)


def test_nearly_equal_costs_are_ties_for_the_picker() -> None:
    s = scorer(tie_s=0.01)
    assert s.score(request(blocks("p", 4)), CycleState(), [endpoint(1), endpoint(2, running=1)]) == [1.0, 1.0]


def test_a_cold_prompt_goes_where_the_cache_has_room_rather_than_evicting() -> None:
    s = scorer(tie_s=0.0, capacity_blocks=300, auto_capacity=False)
    full, roomy = endpoint(1), endpoint(2)
    s.prefix.index.record(full.address, list(range(1, 301)))  # full of other prompts
    s.prefix.index.record(roomy.address, list(range(1000, 1010)))
    state = CycleState()
    scores = s.score(request(blocks("new", 200)), state, [full, roomy])
    p = state["latency"]
    assert p.ttft[0] == pytest.approx(p.ttft[1])  # the same time to first token...
    assert p.cost[0] > p.cost[1] and scores[1] > scores[0]  # ...but one would push 3,200 tokens out


# -- objectives --------------------------------------------------------------------------------------------


def test_endpoints_predicted_to_miss_the_objective_are_avoided() -> None:
    s = scorer(tie_s=0.0)
    slow, fast = endpoint(1, running=200), endpoint(2)
    scores = s.score(request(blocks("p", 4), slo_ttft_s=0.1, slo_tpot_s=0.02), CycleState(), [slow, fast])
    assert scores[1] == 1.0 and scores[0] < 0.02


def test_a_sheddable_request_nobody_can_serve_in_time_is_429() -> None:
    s = scorer()
    busy = [endpoint(1, running=100), endpoint(2, running=100)]
    with pytest.raises(Rejection) as info:
        s.score(request(blocks("p", 200), slo_ttft_s=0.05, priority=-1), CycleState(), busy)
    assert (info.value.status, info.value.code) == (429, "slo_unattainable")
    assert "TTFT <= 50 ms" in info.value.message
    # Not sheddable: served anyway, by the least bad.
    scores = s.score(request(blocks("p", 200), slo_ttft_s=0.05), CycleState(), busy)
    assert max(scores) == 1.0


# -- lifecycle -----------------------------------------------------------------------------------------------


def test_only_streamed_first_chunks_teach_the_model() -> None:
    s = scorer()
    e = endpoint(1)
    for stream in (False, True):
        req, state = request(blocks("p", 20), stream=stream), CycleState()
        s.score(req, state, [e])
        s.pre_request(req, state, e)
        s.response_started(req, state, e, 5.0)
        assert s.model.observations(e.address) == (1 if stream else 0)


def test_a_request_that_never_answered_releases_its_backlog_at_its_end() -> None:
    s = scorer()
    e = endpoint(1)
    req, state = request(blocks("p", 20)), CycleState()
    s.score(req, state, [e])
    s.pre_request(req, state, e)
    assert s.endpoint_details(e)["backlog_tokens"] == 320
    s.response_complete(req, state, e, 0)
    assert s.endpoint_details(e)["backlog_tokens"] == 0


def test_a_served_elsewhere_report_moves_the_backlog() -> None:
    s = scorer()
    a, b = endpoint(1), endpoint(2)
    req, state = request(blocks("p", 20)), CycleState()
    s.score(req, state, [a, b])
    s.pre_request(req, state, a)
    s.pre_request(req, state, b)  # the gateway: b served it
    assert (s.endpoint_details(a)["backlog_tokens"], s.endpoint_details(b)["backlog_tokens"]) == (0, 320)


def test_built_from_the_config_with_its_own_index_and_explained() -> None:
    config = load_config(
        None, {"scheduling": {"scorers": [{"type": "latency", "params": {"locality": 0.3}}]}}
    )
    pool = EndpointPool([endpoint(1), endpoint(2)])
    scheduler = build_scheduler(PluginContext(config, pool, random.Random(0)))
    result = scheduler.schedule(request(blocks("p", 20)), CycleState(), pool.all(), explain=True)
    assert result.explanation is not None
    details = result.explanation[0].details
    assert {
        "latency.ttft_ms",
        "latency.prefill_ms",
        "latency.backlog_tokens",
        "latency.uncached_tokens",
    } <= set(details)
    assert details["latency.uncached_tokens"] == 320
    pool.replace([endpoint(1)])  # the scorer forgets a removed endpoint's state
    assert scheduler.scorers[0][0].model.observations("10.0.0.2:8000") == 0
