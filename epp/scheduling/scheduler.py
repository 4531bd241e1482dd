"""The scheduler: filters → weighted scorers → picker, over the candidate endpoints.

    total(e) = Σ_s weight_s × clamp(score_s(e), 0, 1)

The picker orders candidates by total and returns the chosen endpoint first, then fallbacks. With
`explain=True` the result also carries, for every candidate, the filter that dropped it or its per-scorer
scores and details, so operators can see why a request went where it went (`epp explain`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.datalayer.endpoints import Endpoint
from epp.errors import Rejection
from epp.scheduling.interfaces import (
    Closes,
    CycleState,
    EndpointDetails,
    Explains,
    Filter,
    Picker,
    PreRequest,
    ResponseComplete,
    ResponseStarted,
    SchedulingRequest,
    Scorer,
)


@dataclass(slots=True)
class CandidateExplanation:
    address: str
    dropped_by: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # raw (unweighted) score per scorer
    details: dict[str, float] = field(default_factory=dict)  # plugins' numbers, keyed "plugin.name"
    total: float = 0.0


@dataclass(slots=True)
class SchedulingResult:
    endpoints: list[Endpoint]  # chosen first, then fallbacks
    explanation: list[CandidateExplanation] | None = None
    details: dict[str, float] | None = None  # request-level plugin numbers, when explaining
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
        self.plugins: list[object] = [*self.filters, *(s for s, _ in self.scorers), picker]
        self.time_plugins = time_plugins

    def hooks(self, kind: type) -> list:
        """The plugins implementing one lifecycle protocol (`PreRequest`, `ResponseStarted`, ...)."""
        assert kind in (PreRequest, ResponseStarted, ResponseComplete, EndpointDetails, Closes)
        return [p for p in self.plugins if isinstance(p, kind)]

    def schedule(
        self,
        request: SchedulingRequest,
        state: CycleState,
        candidates: Sequence[Endpoint],
        *,
        count: int = 1,
        explain: bool = False,
    ) -> SchedulingResult:
        """Choose up to `count` endpoints among `candidates` (the director applied the gateway's subset).
        Raises Rejection(503) when no candidate remains, naming the filter that removed the last ones."""
        timings: dict[str, float] | None = {} if self.time_plugins else None
        clock = time.perf_counter
        explained = {e.address: CandidateExplanation(e.address) for e in candidates} if explain else None
        if not candidates:
            raise Rejection(503, "no_endpoints", "no model-server endpoints are known in the pool")

        remaining = list(candidates)
        for plugin in self.filters:
            start = clock() if timings is not None else 0.0
            kept = plugin.filter(request, state, remaining)
            if timings is not None:
                timings[plugin.name] = clock() - start
            if explained is not None and len(kept) != len(remaining):
                kept_ids = {id(e) for e in kept}
                for endpoint in remaining:
                    if id(endpoint) not in kept_ids:
                        explained[endpoint.address].dropped_by = plugin.name
            if not kept:
                raise Rejection(
                    503,
                    "no_endpoints",
                    f"no candidate endpoint: filter '{plugin.name}' removed all {len(remaining)} remaining "
                    f"of {len(candidates)} endpoints",
                )
            remaining = kept

        totals = [0.0] * len(remaining)
        for scorer, weight in self.scorers:
            start = clock() if timings is not None else 0.0
            scores = scorer.score(request, state, remaining)
            if timings is not None:
                timings[scorer.name] = clock() - start
            # Clamp inline: this loop runs (scorers x candidates) times per request.
            totals = [
                t + weight * (0.0 if v < 0.0 else (1.0 if v > 1.0 else v))
                for t, v in zip(totals, scores, strict=True)
            ]
            if explained is not None:
                for endpoint, value in zip(remaining, scores, strict=True):
                    explained[endpoint.address].scores[scorer.name] = _clamp(value)

        start = clock() if timings is not None else 0.0
        chosen = self.picker.pick(request, state, remaining, totals, count)
        if timings is not None:
            timings[self.picker.name] = clock() - start
        if explained is None:
            return SchedulingResult(chosen, None, None, timings)
        details: dict[str, float] = {}
        for explainer in self.plugins:
            if isinstance(explainer, Explains):
                summary, per_candidate = explainer.explain(request, state, remaining)
                name = getattr(explainer, "name", type(explainer).__name__)
                details.update({f"{name}.{k}": v for k, v in summary.items()})
                for endpoint, numbers in zip(remaining, per_candidate, strict=True):
                    explained[endpoint.address].details.update({f"{name}.{k}": v for k, v in numbers.items()})
        for endpoint, total in zip(remaining, totals, strict=True):
            explained[endpoint.address].total = total
        return SchedulingResult(chosen, list(explained.values()), details, timings)
