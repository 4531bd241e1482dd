"""The scheduler: filters → weighted scorers → picker, over the pool's endpoints.

    total(e) = Σ_s weight_s × clamp(score_s(e), 0, 1)

The picker orders candidates by total and returns the chosen endpoint first, then fallbacks. With
`explain=True` the result also carries, for every endpoint, the filter that dropped it or its per-scorer
scores, so operators can see why a request went where it went (`epp explain`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.datastore.endpoints import Endpoint
from epp.errors import Rejection
from epp.scheduling.interfaces import Filter, Picker, PickObserver, SchedulingRequest, Scorer


@dataclass(slots=True)
class CandidateExplanation:
    address: str
    dropped_by: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # raw (unweighted) score per scorer
    total: float = 0.0


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # chosen first, then fallbacks
    explanation: list[CandidateExplanation] | None = None
    # Seconds spent per plugin (for the per-plugin duration metric), filled only when timing is on.
    plugin_seconds: dict[str, float] | None = None


def _clamp(value: float) -> float:
    return 0.0 if value < 0.0 else (1.0 if value > 1.0 else value)


class Scheduler:
    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
        *,
        time_plugins: bool = False,
    ) -> None:
        self.filters = list(filters)
        self.scorers = [(s, w) for s, w in scorers if w > 0]
        self.picker = picker
        self.observers: list[PickObserver] = [
            p for p in (*self.filters, *(s for s, _ in self.scorers), picker) if isinstance(p, PickObserver)
        ]
        self.time_plugins = time_plugins

    def schedule(
        self,
        request: SchedulingRequest,
        endpoints: Sequence[Endpoint],
        *,
        count: int = 1,
        explain: bool = False,
    ) -> SchedulingResult:
        """Choose up to `count` endpoints. Raises Rejection(503) when no candidate remains, naming the
        filter that removed the last ones."""
        timings: dict[str, float] | None = {} if self.time_plugins else None
        clock = time.perf_counter
        explained = {e.address: CandidateExplanation(e.address) for e in endpoints} if explain else None
        if not endpoints:
            raise Rejection(503, "no_endpoints", "no model-server endpoints are known in the pool")

        candidates = list(endpoints)
        for plugin in self.filters:
            start = clock() if timings is not None else 0.0
            kept = plugin.filter(request, candidates)
            if timings is not None:
                timings[plugin.name] = clock() - start
            if explained is not None and len(kept) != len(candidates):
                kept_ids = {id(e) for e in kept}
                for endpoint in candidates:
                    if id(endpoint) not in kept_ids:
                        explained[endpoint.address].dropped_by = plugin.name
            if not kept:
                code = "subset_empty" if plugin.name == "subset-hint" else "no_endpoints"
                raise Rejection(
                    503,
                    code,
                    f"no candidate endpoint: filter '{plugin.name}' removed all {len(candidates)} remaining "
                    f"of {len(endpoints)} endpoints",
                )
            candidates = kept

        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            start = clock() if timings is not None else 0.0
            scores = scorer.score(request, candidates)
            if timings is not None:
                timings[scorer.name] = clock() - start
            # Clamp inline: this loop runs (scorers x candidates) times per request.
            totals = [
                t + weight * (0.0 if v < 0.0 else (1.0 if v > 1.0 else v))
                for t, v in zip(totals, scores, strict=True)
            ]
            if explained is not None:
                for endpoint, value in zip(candidates, scores, strict=True):
                    explained[endpoint.address].scores[scorer.name] = _clamp(value)

        start = clock() if timings is not None else 0.0
        chosen = self.picker.pick(request, candidates, totals, count)
        if timings is not None:
            timings[self.picker.name] = clock() - start
        explanation = None
        if explained is not None:
            for endpoint, total in zip(candidates, totals, strict=True):
                explained[endpoint.address].total = total
            explanation = list(explained.values())
        return SchedulingResult(chosen, explanation, timings)

    def observe(self, request: SchedulingRequest, endpoint: Endpoint) -> None:
        """Tell learning plugins which endpoint got (or served) the request."""
        for observer in self.observers:
            observer.observe(request, endpoint)
