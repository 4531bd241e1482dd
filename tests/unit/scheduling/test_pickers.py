"""Pickers: max-score (random tie-break, fallbacks by total) and weighted-random (∝ total)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.datalayer.endpoints import Endpoint
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.pickers.max_score import MaxScorePicker
from epp.scheduling.plugins.pickers.weighted_random import WeightedRandomPicker

REQUEST = SchedulingRequest("r", "m", "m")
STATE = CycleState()


def pool(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000") for i in range(n)]


def test_max_score_picks_the_maximum() -> None:
    candidates = pool(5)
    totals = [1.0, 4.5, 2.0, 4.4, 0.0]
    picker = MaxScorePicker(random.Random(1))
    for _ in range(50):
        assert picker.pick(REQUEST, STATE, candidates, totals, 1) == [candidates[1]]


def test_max_score_ties_are_broken_at_random_covering_every_tied_endpoint() -> None:
    candidates = pool(4)
    totals = [3.0, 3.0, 1.0, 3.0 - 1e-12]  # within epsilon counts as tied
    picker = MaxScorePicker(random.Random(2))
    chosen = Counter(picker.pick(REQUEST, STATE, candidates, totals, 1)[0].address for _ in range(600))
    assert set(chosen) == {candidates[0].address, candidates[1].address, candidates[3].address}
    # Roughly uniform: each of the 3 tied gets about 200.
    assert all(120 < n < 280 for n in chosen.values()), chosen


def test_max_score_tie_break_is_reproducible_with_a_seed() -> None:
    candidates = pool(3)
    totals = [1.0, 1.0, 1.0]
    runs = [
        [MaxScorePicker(r).pick(REQUEST, STATE, candidates, totals, 1)[0].address for _ in range(30)]
        for r in (random.Random(9), random.Random(9))
    ]
    assert runs[0] == runs[1]


def test_max_score_fallbacks_in_descending_total() -> None:
    candidates = pool(5)
    totals = [0.5, 3.0, 2.0, 4.0, 1.0]
    picked = MaxScorePicker(random.Random(3)).pick(REQUEST, STATE, candidates, totals, 4)
    assert [candidates.index(e) for e in picked] == [3, 1, 2, 4]


def test_max_score_near_ties_are_random_also_when_fallbacks_are_requested() -> None:
    candidates = pool(2)
    totals = [2 * 0.3, 2 * 0.1 + 2 * 0.2]  # 0.6 and 0.6000000000000001: equal within epsilon
    picker = MaxScorePicker(random.Random(10))
    firsts = {picker.pick(REQUEST, STATE, candidates, totals, 2)[0].address for _ in range(100)}
    assert firsts == {candidates[0].address, candidates[1].address}


def test_max_score_count_larger_than_pool_returns_all_distinct() -> None:
    candidates = pool(3)
    picked = MaxScorePicker(random.Random(4)).pick(REQUEST, STATE, candidates, [1.0, 2.0, 3.0], 10)
    assert picked == [candidates[2], candidates[1], candidates[0]]


def test_max_score_fallback_ties_are_shuffled_but_stay_below_higher_totals() -> None:
    candidates = pool(4)
    totals = [1.0, 1.0, 1.0, 5.0]
    picker = MaxScorePicker(random.Random(5))
    seconds: Counter[str] = Counter()
    for _ in range(300):
        picked = picker.pick(REQUEST, STATE, candidates, totals, 4)
        assert picked[0] is candidates[3]
        assert len({id(e) for e in picked}) == 4
        seconds[picked[1].address] += 1
    assert len(seconds) == 3


def test_weighted_random_is_roughly_proportional_to_totals() -> None:
    candidates = pool(4)
    totals = [1.0, 2.0, 3.0, 0.0]
    picker = WeightedRandomPicker(random.Random(6))
    n = 6000
    chosen = Counter(picker.pick(REQUEST, STATE, candidates, totals, 1)[0] for _ in range(n))
    assert chosen[candidates[3]] == 0  # zero total never wins while others are positive
    for i, expected in ((0, 1 / 6), (1, 2 / 6), (2, 3 / 6)):
        assert chosen[candidates[i]] / n == pytest.approx(expected, abs=0.03)


def test_weighted_random_all_zero_is_uniform() -> None:
    candidates = pool(3)
    picker = WeightedRandomPicker(random.Random(7))
    chosen = Counter(picker.pick(REQUEST, STATE, candidates, [0.0, 0.0, 0.0], 1)[0] for _ in range(3000))
    for e in candidates:
        assert chosen[e] / 3000 == pytest.approx(1 / 3, abs=0.05)


def test_weighted_random_fallbacks_are_distinct_and_zero_totals_come_last() -> None:
    candidates = pool(5)
    totals = [2.0, 0.0, 1.0, 0.0, 3.0]
    picker = WeightedRandomPicker(random.Random(8))
    for _ in range(200):
        picked = picker.pick(REQUEST, STATE, candidates, totals, 5)
        assert len({id(e) for e in picked}) == 5
        assert {candidates.index(e) for e in picked[3:]} == {1, 3}
