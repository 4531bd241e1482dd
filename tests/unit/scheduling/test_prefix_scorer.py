"""Prefix-cache scorer: ratio of leading blocks held, the load guard against herding, and learning.

Block = 64 characters (the scorer's block_chars). Prompts here are built block by block so the expected
ratios are exact.
"""

from __future__ import annotations

import random

import pytest

from epp.config import load_config
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.scheduling.interfaces import CycleState, PreRequest, SchedulingRequest
from epp.scheduling.plugins.prefix_cache.index import PrefixIndex, block_hashes
from epp.scheduling.plugins.prefix_cache.scorer import PrefixCacheParams, PrefixCacheScorer
from epp.scheduling.registry import PluginContext, build_scheduler
from epp.scheduling.scheduler import Scheduler

BLOCK = 64


def blocks(tag: str, count: int) -> str:
    """`count` distinct 64-character blocks."""
    return "".join(f"{tag}-block-{i:04d}-".ljust(BLOCK, "x") for i in range(count))


def endpoint(index: int, *, waiting: float = 0, running: float = 0, inflight: int = 0) -> Endpoint:
    e = Endpoint(
        f"10.0.0.{index}:8000", metrics=MetricsSnapshot(waiting=waiting, running=running, updated_at=1.0)
    )
    e.inflight_requests = inflight
    return e


def request(prompt: str, *, model: str = "m", salt: str = "") -> SchedulingRequest:
    return SchedulingRequest("r", model=model, target_model=model, prompt=prompt, cache_salt=salt)


def hashes_of(prompt: str, model: str = "m", salt: str = "") -> list[int]:
    return block_hashes(prompt, seed_model=model, cache_salt=salt, block_chars=BLOCK, max_blocks=256)


def scorer(index: PrefixIndex, load_gap: float = 4.0, **prefix: object) -> PrefixCacheScorer:
    return PrefixCacheScorer(PrefixCacheParams(load_gap=load_gap, **prefix), index)  # type: ignore[arg-type]


# -- ratio ------------------------------------------------------------------------------------------------


def test_ratio_is_leading_blocks_held_over_prompt_blocks() -> None:
    prompt = blocks("p", 10)
    h = hashes_of(prompt)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", h[:5])
    index.record("10.0.0.2:8000", h[:3])
    index.record("10.0.0.3:8000", h)
    candidates = [endpoint(1), endpoint(2), endpoint(3), endpoint(4)]
    assert scorer(index).score(request(prompt), CycleState(), candidates) == pytest.approx(
        [0.5, 0.3, 1.0, 0.0]
    )


def test_only_consecutive_leading_blocks_count() -> None:
    prompt = blocks("p", 10)
    index = PrefixIndex()
    # Endpoint 1 served a prompt that diverges from this one at block 2: chained hashes make every later
    # block differ, so only 2 leading blocks match. Endpoint 2 served the same text behind another block.
    index.record("10.0.0.1:8000", hashes_of(prompt[: 2 * 64] + blocks("q", 8)))
    index.record("10.0.0.2:8000", hashes_of(blocks("x", 1) + prompt))
    assert scorer(index).score(request(prompt), CycleState(), [endpoint(1), endpoint(2)]) == pytest.approx(
        [0.2, 0.0]
    )


def test_trailing_partial_block_is_not_counted() -> None:
    prefix = blocks("p", 4)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", hashes_of(prefix))
    # 4 full blocks + 40 characters: still 4 blocks, all held.
    assert scorer(index).score(request(prefix + "y" * 40), CycleState(), [endpoint(1)]) == [1.0]


def test_shared_prefix_with_different_suffix_matches_the_shared_part() -> None:
    shared = blocks("system", 6)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", hashes_of(shared + blocks("question-a", 2)))
    scores = scorer(index).score(
        request(shared + blocks("question-b", 2)), CycleState(), [endpoint(1), endpoint(2)]
    )
    assert scores == pytest.approx([6 / 8, 0.0])


def test_prompt_shorter_than_a_block_scores_zero() -> None:
    index = PrefixIndex()
    assert scorer(index).score(request("hello"), CycleState(), [endpoint(1), endpoint(2)]) == [0.0, 0.0]


def test_other_model_or_salt_never_matches() -> None:
    prompt = blocks("p", 4)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", hashes_of(prompt, model="m", salt=""))
    s = scorer(index)
    assert s.score(request(prompt, model="other"), CycleState(), [endpoint(1)]) == [0.0]
    assert s.score(request(prompt, salt="tenant-b"), CycleState(), [endpoint(1)]) == [0.0]
    assert s.score(request(prompt), CycleState(), [endpoint(1)]) == [1.0]


def test_hashes_are_computed_once_per_request() -> None:
    s = scorer(PrefixIndex())
    req = request(blocks("p", 3))
    state = CycleState()
    s.score(req, state, [endpoint(1)])
    first = state["prefix-cache"].hashes
    assert first == hashes_of(blocks("p", 3))
    s.score(req, state, [endpoint(1)])
    s.pre_request(req, state, endpoint(1))
    assert state["prefix-cache"].hashes is first


def test_max_blocks_caps_the_blocks_compared() -> None:
    prompt = blocks("p", 20)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", hashes_of(prompt)[:8])
    # Only the first 8 blocks count: holding them is a full match.
    assert scorer(index, max_blocks=8).score(request(prompt), CycleState(), [endpoint(1)]) == [1.0]


# -- load guard -----------------------------------------------------------------------------------------


def warm_index(prompt: str, *addresses: str) -> PrefixIndex:
    index = PrefixIndex()
    for address in addresses:
        index.record(address, hashes_of(prompt))
    return index


def test_endpoint_load_is_max_of_inflight_and_scraped() -> None:
    assert endpoint(1, waiting=3, running=2, inflight=4).load == 5
    assert endpoint(1, waiting=1, running=1, inflight=7).load == 7


def test_load_guard_keeps_full_affinity_within_the_gap() -> None:
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    # Warm replica is exactly load_gap (4) ahead of the least loaded: no discount.
    candidates = [endpoint(1, waiting=2, running=3), endpoint(2, running=1)]
    assert scorer(index).score(request(prompt), CycleState(), candidates) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(("load", "expected"), [(5, 4 / 5), (8, 4 / 8), (12, 4 / 12), (40, 4 / 40)])
def test_load_guard_formula_beyond_the_gap(load: int, expected: float) -> None:
    # score = ratio × min(1, load_gap / (load − min_load)); here min load 0, ratio 1.
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    candidates = [endpoint(1, waiting=load), endpoint(2), endpoint(3, waiting=1)]
    scores = scorer(index).score(request(prompt), CycleState(), candidates)
    assert scores == pytest.approx([expected, 0.0, 0.0])


def test_load_guard_is_relative_to_the_least_loaded_candidate() -> None:
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    # Everyone busy; warm replica 6 ahead of the minimum (10): 4 / 6.
    candidates = [endpoint(1, waiting=16), endpoint(2, waiting=10), endpoint(3, waiting=12)]
    assert scorer(index).score(request(prompt), CycleState(), candidates)[0] == pytest.approx(4 / 6)


def test_load_guard_scales_partial_ratio() -> None:
    prompt = blocks("p", 10)
    index = PrefixIndex()
    index.record("10.0.0.1:8000", hashes_of(prompt)[:5])
    candidates = [endpoint(1, inflight=8), endpoint(2)]
    assert scorer(index).score(request(prompt), CycleState(), candidates) == pytest.approx([0.5 * 4 / 8, 0.0])


def test_load_guard_uses_inflight_before_scrape_catches_up() -> None:
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    # Scraped metrics say idle, but we sent it 10 requests a moment ago.
    candidates = [endpoint(1, inflight=10), endpoint(2)]
    assert scorer(index).score(request(prompt), CycleState(), candidates)[0] == pytest.approx(0.4)


def test_load_gap_zero_disables_the_guard() -> None:
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    candidates = [endpoint(1, waiting=100), endpoint(2)]
    assert scorer(index, load_gap=0.0).score(request(prompt), CycleState(), candidates) == [1.0, 0.0]


def test_custom_load_gap() -> None:
    prompt = blocks("p", 8)
    index = warm_index(prompt, "10.0.0.1:8000")
    candidates = [endpoint(1, waiting=10), endpoint(2)]
    assert scorer(index, load_gap=10.0).score(request(prompt), CycleState(), candidates)[0] == 1.0
    assert scorer(index, load_gap=2.0).score(request(prompt), CycleState(), candidates)[0] == pytest.approx(
        0.2
    )


# -- through the default scheduler: herding vs locality ---------------------------------------------------


def default_scheduler(seed: int = 7) -> tuple[Scheduler, PrefixIndex]:
    config = load_config(None, {"scheduling": {"seed": seed}})
    sched = build_scheduler(PluginContext(config, EndpointPool(), random.Random(seed)))
    prefix = sched.scorers[0][0]
    assert isinstance(prefix, PrefixCacheScorer)
    return sched, prefix.index


def observe(sched: Scheduler, req: SchedulingRequest, endpoint: Endpoint) -> None:
    """What the director does once a request was sent: every plugin's pre_request hook."""
    for hook in sched.hooks(PreRequest):
        hook.pre_request(req, CycleState(), endpoint)


def test_default_profile_keeps_locality_while_warm_replica_is_within_the_gap() -> None:
    sched, index = default_scheduler()
    prompt = blocks("p", 16)
    index.record("10.0.0.1:8000", hashes_of(prompt))
    # The warm replica has a slightly longer queue (queue scorer: 0 for it, 1 for the others) but is
    # within the load gap: prefix weight 3 outweighs queue weight 2.
    candidates = [endpoint(1, waiting=3), endpoint(2), endpoint(3)]
    result = sched.schedule(request(prompt), CycleState(), candidates)
    assert result.endpoints[0].address == "10.0.0.1:8000"


def test_default_profile_yields_affinity_when_warm_replica_is_overloaded() -> None:
    sched, index = default_scheduler()
    prompt = blocks("p", 16)
    index.record("10.0.0.1:8000", hashes_of(prompt))
    candidates = [endpoint(1, waiting=20), endpoint(2), endpoint(3)]
    result = sched.schedule(request(prompt), CycleState(), candidates, explain=True)
    assert result.endpoints[0].address != "10.0.0.1:8000"
    assert result.explanation is not None
    warm = next(c for c in result.explanation if c.address == "10.0.0.1:8000")
    assert warm.scores["prefix-cache"] == pytest.approx(4 / 20)


def test_pre_request_teaches_the_index_so_the_next_request_sticks() -> None:
    sched, index = default_scheduler()
    shared = blocks("system", 12)
    candidates = [endpoint(i) for i in range(1, 5)]
    first = request(shared + blocks("q0", 1))
    chosen = sched.schedule(first, CycleState(), candidates).endpoints[0]
    assert index.entries(chosen.address) == 0  # scheduling alone does not record
    observe(sched, first, chosen)
    assert index.entries(chosen.address) == 13
    for i in range(1, 20):
        follow_up = request(shared + blocks(f"q{i}", 1))
        assert sched.schedule(follow_up, CycleState(), candidates).endpoints[0] is chosen


def test_pre_request_records_on_the_served_endpoint_only() -> None:
    sched, index = default_scheduler()
    prompt = blocks("p", 4)
    a, b = endpoint(1), endpoint(2)
    observe(sched, request(prompt), b)
    assert index.match(hashes_of(prompt), [a.address, b.address]) == [0, 4]


def test_pre_request_ignores_prompts_without_a_full_block() -> None:
    sched, index = default_scheduler()
    observe(sched, request("short"), endpoint(1))
    assert index.entries("10.0.0.1:8000") == 0


def test_pre_request_sizes_the_endpoint_from_its_cache_shape() -> None:
    index = PrefixIndex()
    s = scorer(index)
    e = endpoint(1)
    # 100 blocks of 16 tokens = 1600 tokens = 1600 * 4 chars / 64 = 100 of our blocks.
    e.metrics = MetricsSnapshot(block_size=16, num_blocks=100, updated_at=1.0)
    s.pre_request(request(blocks("a", 150)), CycleState(), e)
    assert index.entries(e.address) == 100
    # auto_capacity off: the default capacity applies.
    index2 = PrefixIndex()
    scorer(index2, auto_capacity=False).pre_request(request(blocks("a", 150)), CycleState(), e)
    assert index2.entries(e.address) == 150


def test_the_index_forgets_endpoints_that_leave_the_pool() -> None:
    config = load_config(None, {"pool": {"endpoints": ["10.0.0.1:8000", "10.0.0.2:8000"]}})
    pool = EndpointPool([endpoint(1), endpoint(2)])
    sched = build_scheduler(PluginContext(config, pool, random.Random(0)))
    prefix = sched.scorers[0][0]
    assert isinstance(prefix, PrefixCacheScorer)
    prefix.pre_request(request(blocks("p", 4)), CycleState(), pool.get("10.0.0.2:8000"))  # type: ignore[arg-type]
    assert prefix.index.entries("10.0.0.2:8000") == 4
    pool.replace([endpoint(1)])
    assert prefix.index.entries("10.0.0.2:8000") == 0
