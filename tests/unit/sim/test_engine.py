"""The simulation core on a virtual clock: prefix cache, eviction, KV pressure, LoRA slots, determinism."""

from __future__ import annotations

import pytest

from epp_lab.sim.config import EngineConfig
from epp_lab.sim.engine import (
    BLOCK_CHARS,
    RUNNING,
    WAITING,
    Engine,
    SimRequest,
    block_hashes,
    prompt_token_count,
)
from epp_lab.sim.profiles import PROFILES, get_profile

PROFILE = get_profile("h100-llama3-8b")
MODEL = "base"


def make(
    text: str, max_tokens: int = 4, model: str = MODEL, lora: str | None = None, rid: str = "r"
) -> SimRequest:
    return SimRequest(
        request_id=rid,
        model=model,
        lora=lora,
        prompt_tokens=prompt_token_count(text),
        max_tokens=max_tokens,
        block_hashes=block_hashes(text, model),
    )


def run_one(engine: Engine, req: SimRequest, now: float) -> float:
    engine.submit(req, now)
    return engine.run_until_idle(now)


def prefix(i: int, chars: int) -> str:
    return (f"<doc {i}>" + "lorem ipsum " * (chars // 12 + 1))[:chars]


def test_block_hashes_are_chained_and_model_seeded() -> None:
    a = block_hashes("x" * 640 + "tail A", "m")
    b = block_hashes("x" * 640 + "tail B" + "y" * 100, "m")
    assert len(a) == 10 and len(b) == 11
    assert a == b[:10]
    # Same block content at a different position gets a different id (chained), and models never share.
    assert len(set(a)) == 10
    assert block_hashes("x" * 640, "other") != a
    assert block_hashes("x" * (BLOCK_CHARS - 1), "m") == []
    assert prompt_token_count("abcde") == 2


def test_profiles_cover_required_names() -> None:
    assert {"h100-llama3-8b", "a100-llama3-8b"} <= set(PROFILES)
    with pytest.raises(ValueError, match="known"):
        get_profile("nope")


def test_ttft_formula_and_cached_prefix_lowers_ttft() -> None:
    eng = Engine(EngineConfig(PROFILE))
    text = prefix(0, 8000) + " question one"
    first = make(text)
    run_one(eng, first, 0.0)
    p = PROFILE
    expected = p.prefill_overhead_s + p.decode_base_s + p.decode_per_seq_s
    expected += p.prefill_per_token_s * first.prompt_tokens + p.decode_per_ctx_token_s * first.prompt_tokens
    assert first.ttft == pytest.approx(expected)
    assert first.cached_tokens == 0

    second = make(prefix(0, 8000) + " another question")
    run_one(eng, second, 100.0)
    assert second.cached_tokens == 8000 // BLOCK_CHARS * 16
    assert second.ttft is not None and first.ttft is not None
    assert second.ttft < first.ttft / 5
    assert eng.stats.cached_tokens == second.cached_tokens
    assert eng.stats.prefix_queries == first.prompt_tokens + second.prompt_tokens


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    eng = Engine(EngineConfig(PROFILE))
    text = "z" * (BLOCK_CHARS * 4)
    run_one(eng, make(text), 0.0)
    again = make(text)
    run_one(eng, again, 10.0)
    assert again.cached_tokens == 3 * 16


def test_lru_eviction_under_pressure() -> None:
    eng = Engine(EngineConfig(PROFILE, num_gpu_blocks=64))  # 1024 tokens: room for ~3 prompts of 20 blocks
    texts = [prefix(i, 20 * BLOCK_CHARS) for i in range(6)]
    t = 0.0
    for text in texts:
        t = run_one(eng, make(text), t)
    assert eng.stats.evicted_blocks > 0
    assert eng.cached_prefix_blocks(block_hashes(texts[0], MODEL)) == 0  # oldest prefix evicted
    assert eng.cached_prefix_blocks(block_hashes(texts[-1], MODEL)) == 20  # newest still cached
    assert eng.kv_usage() == 0.0  # cached-but-free blocks do not count as used


def test_eviction_takes_a_prompts_tail_before_its_head() -> None:
    eng = Engine(EngineConfig(PROFILE, num_gpu_blocks=30))
    shared = prefix(1, 20 * BLOCK_CHARS)
    t = run_one(eng, make(shared), 0.0)
    # A newcomer needing 15 blocks forces 5 evictions (10 blocks were never used): they come from the tail.
    run_one(eng, make(prefix(2, 15 * BLOCK_CHARS), max_tokens=1), t)
    assert eng.cached_prefix_blocks(block_hashes(shared, MODEL)) == 15


def test_kv_full_makes_requests_wait_fcfs() -> None:
    eng = Engine(EngineConfig(PROFILE, num_gpu_blocks=100))
    big = [make(prefix(i, 60 * BLOCK_CHARS), max_tokens=50, rid=str(i)) for i in range(3)]
    for r in big:
        eng.submit(r, 0.0)
    eng.finish(eng.schedule(), 1.0)
    assert [r.state for r in big] == [RUNNING, WAITING, WAITING]
    assert len(eng.waiting) == 2 and eng.kv_usage() == 0.6
    eng.run_until_idle(1.0)
    assert all(r.generated == 50 for r in big)
    # Served in arrival order.
    assert big[0].first_token_time < big[1].first_token_time < big[2].first_token_time  # type: ignore[operator]


def test_max_num_seqs_caps_the_batch() -> None:
    eng = Engine(EngineConfig(PROFILE, max_num_seqs=2))
    reqs = [make(prefix(i, 200), rid=str(i)) for i in range(5)]
    for r in reqs:
        eng.submit(r, 0.0)
    eng.finish(eng.schedule(), 1.0)
    assert len(eng.running) == 2 and len(eng.waiting) == 3


def test_decode_step_grows_with_batch_size() -> None:
    def tpot(n: int) -> float:
        eng = Engine(EngineConfig(PROFILE))
        reqs = [make(prefix(i, 400), max_tokens=20, rid=str(i)) for i in range(n)]
        for r in reqs:
            eng.submit(r, 0.0)
        eng.run_until_idle()
        r = reqs[0]
        return (r.finish_time - r.first_token_time) / 19  # type: ignore[operator]

    one, many = tpot(1), tpot(128)
    assert 0.010 <= one <= 0.015
    assert many > one * 1.5


def test_chunked_prefill_respects_token_budget() -> None:
    eng = Engine(EngineConfig(PROFILE, max_num_batched_tokens=512))
    req = make("q" * 4 * 2000)
    eng.submit(req, 0.0)
    batch = eng.schedule()
    assert batch.scheduled == [(req, 512)]
    eng.finish(batch, batch.duration)
    assert req.generated == 0 and req.num_computed == 512
    eng.run_until_idle(batch.duration)
    assert req.generated == req.max_tokens


def test_preemption_when_decode_cannot_grow() -> None:
    # Two requests whose prompts fit but whose outputs do not: the later one is preempted and recomputed.
    eng = Engine(EngineConfig(PROFILE, num_gpu_blocks=20))
    a = make(prefix(1, 8 * BLOCK_CHARS), max_tokens=60, rid="a")
    b = make(prefix(2, 8 * BLOCK_CHARS), max_tokens=60, rid="b")
    eng.submit(a, 0.0)
    eng.submit(b, 0.0)
    eng.run_until_idle()
    assert eng.stats.preemptions >= 1
    assert a.generated == b.generated == 60
    assert eng.stats.completed == 2 and eng.kv_usage() == 0.0


def test_lora_slots_load_delay_and_waiting() -> None:
    eng = Engine(EngineConfig(PROFILE, max_lora=1))
    a1 = make("hello " * 50, max_tokens=30, model="a", lora="a", rid="a1")
    b1 = make("hello " * 50, max_tokens=5, model="b", lora="b", rid="b1")
    base = make("hello " * 50, max_tokens=5, rid="base")
    for r in (a1, b1, base):
        eng.submit(r, 0.0)
    batch = eng.schedule()
    assert batch.lora_loads == 1
    # b waits for the only slot, held by a running request; the base-model request is not blocked by it.
    assert [r.state for r in (a1, b1, base)] == [RUNNING, WAITING, RUNNING]
    assert eng.waiting_loras() == ["b"] and eng.running_loras() == ["a"]
    eng.finish(batch, batch.duration)
    eng.run_until_idle(batch.duration)
    assert eng.stats.lora_loads == 2
    assert b1.first_token_time >= a1.finish_time  # type: ignore[operator]
    # A resident adapter costs nothing more; the load shows in TTFT.
    again = make("hello " * 50 + "!", max_tokens=2, model="b", lora="b")
    run_one(eng, again, 100.0)
    assert eng.stats.lora_loads == 2
    assert a1.ttft > again.ttft + PROFILE.lora_load_s * 0.9  # type: ignore[operator]


def test_abort_frees_blocks_and_slots() -> None:
    eng = Engine(EngineConfig(PROFILE, max_lora=1))
    r = make("x" * 4000, max_tokens=100, model="a", lora="a")
    eng.submit(r, 0.0)
    eng.finish(eng.schedule(), 1.0)
    assert eng.kv_usage() > 0
    eng.abort(r)
    assert eng.kv_usage() == 0.0 and not eng.has_work() and eng.running_loras() == []
    assert eng.stats.aborted == 1


def test_deterministic() -> None:
    def trace() -> list[tuple[float | None, float | None, int]]:
        eng = Engine(EngineConfig(PROFILE, num_gpu_blocks=200, max_lora=2))
        reqs = []
        for i in range(40):
            lora = ("a", "b", "c", None)[i % 4]
            r = make(
                prefix(i % 7, 300 + 37 * i), max_tokens=5 + i % 9, model=lora or MODEL, lora=lora, rid=str(i)
            )
            reqs.append(r)
            eng.submit(r, i * 0.01)
        eng.run_until_idle()
        return [(r.first_token_time, r.finish_time, r.cached_tokens) for r in reqs]

    assert trace() == trace()
