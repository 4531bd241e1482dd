"""The scheduler core: weighted sum of clamped scores, filters' rejections, explain output, plugin hooks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from epp.config import load_config
from epp.datalayer.endpoints import Endpoint, EndpointPool, MetricsSnapshot
from epp.errors import Rejection
from epp.scheduling.interfaces import CycleState, PreRequest, SchedulingRequest
from epp.scheduling.plugins.filters.healthy import HealthyFilter
from epp.scheduling.plugins.pickers.max_score import MaxScorePicker
from epp.scheduling.plugins.scorers.kv_cache import KVCacheScorer
from epp.scheduling.plugins.scorers.queue import QueueScorer
from epp.scheduling.registry import PluginContext, build_scheduler
from epp.scheduling.scheduler import Scheduler


class Fixed:
    """A scorer returning fixed values (possibly out of range), counting its calls."""

    def __init__(self, name: str, values: Sequence[float]) -> None:
        self.name = name
        self.values = list(values)
        self.calls = 0

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        self.calls += 1
        return self.values[: len(candidates)]


class RecordingPicker:
    """Picks the highest total (first on ties) and remembers the totals it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.totals: list[float] = []

    def pick(self, request, state, candidates, totals, count):  # type: ignore[no-untyped-def]
        self.totals = list(totals)
        order = sorted(range(len(candidates)), key=lambda i: -totals[i])
        return [candidates[i] for i in order[:count]]


class Learner:
    name = "learner"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        return [0.0] * len(candidates)

    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None:
        self.seen.append((request.request_id, endpoint.address))


def pool(n: int = 3) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8000", metrics=MetricsSnapshot(updated_at=1.0)) for i in range(1, n + 1)]


REQUEST = SchedulingRequest("r1", "m", "m")


def test_total_is_weighted_sum_of_scores() -> None:
    picker = RecordingPicker()
    sched = Scheduler([], [(Fixed("a", [1.0, 0.5, 0.0]), 2.0), (Fixed("b", [0.0, 0.5, 1.0]), 3.0)], picker)
    result = sched.schedule(REQUEST, CycleState(), pool())
    assert picker.totals == pytest.approx([2.0, 2.5, 3.0])
    assert result.endpoints[0].address == "10.0.0.3:8000"


def test_weights_change_the_decision() -> None:
    queue_heavy = Scheduler(
        [], [(Fixed("q", [1.0, 0.0]), 5.0), (Fixed("kv", [0.0, 1.0]), 1.0)], RecordingPicker()
    )
    kv_heavy = Scheduler(
        [], [(Fixed("q", [1.0, 0.0]), 1.0), (Fixed("kv", [0.0, 1.0]), 5.0)], RecordingPicker()
    )
    assert queue_heavy.schedule(REQUEST, CycleState(), pool(2)).endpoints[0].address == "10.0.0.1:8000"
    assert kv_heavy.schedule(REQUEST, CycleState(), pool(2)).endpoints[0].address == "10.0.0.2:8000"


def test_scores_are_clamped_to_unit_interval_before_weighting() -> None:
    picker = RecordingPicker()
    sched = Scheduler([], [(Fixed("wild", [-0.5, 1.7, 0.5]), 2.0)], picker)
    result = sched.schedule(REQUEST, CycleState(), pool(), explain=True)
    assert picker.totals == pytest.approx([0.0, 2.0, 1.0])
    assert result.explanation is not None
    assert [c.scores["wild"] for c in result.explanation] == pytest.approx([0.0, 1.0, 0.5])


def test_zero_weight_scorer_is_not_run() -> None:
    ignored = Fixed("ignored", [1.0, 0.0, 0.0])
    picker = RecordingPicker()
    sched = Scheduler([], [(ignored, 0.0), (Fixed("used", [0.0, 0.0, 1.0]), 1.0)], picker)
    result = sched.schedule(REQUEST, CycleState(), pool(), explain=True)
    assert ignored.calls == 0
    assert result.explanation is not None
    assert picker.totals == [0.0, 0.0, 1.0]
    assert all("ignored" not in c.scores for c in result.explanation)


def test_count_returns_chosen_then_fallbacks() -> None:
    sched = Scheduler([], [(Fixed("a", [0.2, 0.9, 0.5]), 1.0)], MaxScorePicker(random.Random(0)))
    result = sched.schedule(REQUEST, CycleState(), pool(), count=3)
    assert [e.address for e in result.endpoints] == ["10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.1:8000"]


def test_empty_pool_is_503_no_endpoints() -> None:
    sched = Scheduler([], [], RecordingPicker())
    with pytest.raises(Rejection) as info:
        sched.schedule(REQUEST, CycleState(), [])
    assert (info.value.status, info.value.code) == (503, "no_endpoints")


def test_filter_removing_everyone_is_503_naming_the_filter() -> None:
    class DropAll:
        name = "drop-all"

        def filter(self, request, state, candidates):  # type: ignore[no-untyped-def]
            return []

    sched = Scheduler([DropAll()], [], RecordingPicker())
    with pytest.raises(Rejection) as info:
        sched.schedule(REQUEST, CycleState(), pool())
    assert (info.value.status, info.value.code) == (503, "no_endpoints")
    assert "drop-all" in info.value.message
    assert "3" in info.value.message


def test_explain_lists_dropped_by_and_per_scorer_scores() -> None:
    endpoints = pool(4)
    endpoints[0].metrics = MetricsSnapshot(waiting=4, kv_usage=0.5, updated_at=1.0)
    endpoints[1].metrics = MetricsSnapshot(waiting=0, kv_usage=0.25, updated_at=1.0)
    endpoints[2].reachable = False
    request = SchedulingRequest("r1", "m", "m")
    sched = Scheduler(
        [HealthyFilter()],
        [(QueueScorer(), 2.0), (KVCacheScorer(), 1.0)],
        MaxScorePicker(random.Random(0)),
    )
    # The director applied the gateway's subset (10.0.0.1-3): the scheduler sees those candidates.
    result = sched.schedule(request, CycleState(), endpoints[:3], explain=True)
    assert result.explanation is not None
    by_address = {c.address: c for c in result.explanation}
    assert list(by_address) == [e.address for e in endpoints[:3]]  # every candidate, pool order

    assert by_address["10.0.0.3:8000"].dropped_by == "healthy"
    for dropped in ("10.0.0.3:8000",):
        assert by_address[dropped].scores == {}

    first, second = by_address["10.0.0.1:8000"], by_address["10.0.0.2:8000"]
    assert first.dropped_by is None and second.dropped_by is None
    assert first.scores == pytest.approx({"queue": 0.0, "kv-cache": 0.5})
    assert second.scores == pytest.approx({"queue": 1.0, "kv-cache": 0.75})
    assert first.total == pytest.approx(0.5)
    assert second.total == pytest.approx(2.75)
    assert result.endpoints[0].address == "10.0.0.2:8000"


def test_no_explanation_unless_asked() -> None:
    sched = Scheduler([], [(QueueScorer(), 1.0)], MaxScorePicker(random.Random(0)))
    assert sched.schedule(REQUEST, CycleState(), pool()).explanation is None


def test_plugin_timings_only_when_enabled() -> None:
    plugins = ([HealthyFilter()], [(QueueScorer(), 1.0)], MaxScorePicker(random.Random(0)))
    assert Scheduler(*plugins).schedule(REQUEST, CycleState(), pool()).plugin_seconds is None
    timed = Scheduler(*plugins, time_plugins=True).schedule(REQUEST, CycleState(), pool()).plugin_seconds
    assert timed is not None
    assert set(timed) == {"healthy", "queue", "max-score"}
    assert all(v >= 0 for v in timed.values())


def test_lifecycle_hooks_are_found_on_every_plugin_that_implements_them() -> None:
    learner = Learner()
    sched = Scheduler([], [(QueueScorer(), 1.0), (learner, 1.0)], MaxScorePicker(random.Random(0)))
    [hook] = sched.hooks(PreRequest)
    target = pool()[2]
    hook.pre_request(REQUEST, CycleState(), target)
    assert learner.seen == [("r1", "10.0.0.3:8000")]


def test_default_config_builds_the_documented_profile() -> None:
    config = load_config(None, {"scheduling": {"seed": 1}})
    sched = build_scheduler(PluginContext(config, EndpointPool(), random.Random(1)))
    assert [f.name for f in sched.filters] == ["healthy"]
    assert [(s.name, w) for s, w in sched.scorers] == [
        ("prefix-cache", 6.0),
        ("queue", 2.0),
        ("kv-cache", 2.0),
        ("lora-affinity", 4.0),
        ("inflight", 1.0),
    ]
    assert sched.picker.name == "max-score"
    assert [type(o).__name__ for o in sched.hooks(PreRequest)] == ["PrefixCacheScorer"]


def test_default_profile_avoids_long_queue_and_full_kv() -> None:
    config = load_config(None, {"scheduling": {"seed": 3}})
    sched = build_scheduler(PluginContext(config, EndpointPool(), random.Random(3)))
    endpoints = pool(3)
    endpoints[0].metrics = MetricsSnapshot(waiting=50, updated_at=1.0)
    endpoints[1].metrics = MetricsSnapshot(kv_usage=0.99, updated_at=1.0)
    chosen = {
        sched.schedule(SchedulingRequest(f"r{i}", "m", "m"), CycleState(), endpoints).endpoints[0].address
        for i in range(50)
    }
    assert chosen == {"10.0.0.3:8000"}


def test_seeded_schedulers_make_the_same_decisions() -> None:
    def run(seed: int) -> list[str]:
        config = load_config(None, {"scheduling": {"seed": seed}})
        sched = build_scheduler(PluginContext(config, EndpointPool(), random.Random(seed)))
        endpoints = pool(5)
        return [
            sched.schedule(SchedulingRequest(f"r{i}", "m", "m"), CycleState(), endpoints).endpoints[0].address
            for i in range(40)
        ]

    assert run(11) == run(11)
    assert len(set(run(11))) > 1  # all tied: the random tie-break spreads them
