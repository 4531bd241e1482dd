"""Model-name routing: client-facing model → target model (weighted rewrites), and objective → priority.

Rule lookup: an exact `name` match wins over the catch-all rule `"*"`. With no rules configured every name
passes through unchanged; with rules but neither a match nor a catch-all, the model is unknown (404).
A pre-set target in header `x-gateway-model-name-rewrite` overrides the rules.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate

from epp.config import Config, ModelRule
from epp.errors import Rejection

CATCH_ALL = "*"


@dataclass(slots=True, frozen=True)
class Target:
    model: str
    lora: bool


class _WeightedTargets:
    __slots__ = ("_cumulative", "_targets", "_total")

    def __init__(self, rule: ModelRule) -> None:
        self._targets = [Target(t.model, t.lora) for t in rule.targets if t.weight > 0]
        self._cumulative = list(accumulate(t.weight for t in rule.targets if t.weight > 0))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def choose(self, rng: random.Random) -> Target | None:
        if not self._targets:
            return None
        if len(self._targets) == 1:
            return self._targets[0]
        return self._targets[bisect.bisect_right(self._cumulative, rng.randrange(self._total))]


class ModelRouter:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random(config.scheduling.seed)
        self._rules = {rule.name: _WeightedTargets(rule) for rule in config.models}
        self._catch_all = self._rules.pop(CATCH_ALL, None)
        self._passthrough = not config.models
        self._lora_targets = {t.model for rule in config.models for t in rule.targets if t.lora}
        self._priorities = {o.name: o.priority for o in config.objectives}
        self._default_priority = config.default_priority

    def resolve(self, model: str, rewrite: str | None = None) -> Target:
        """The target for `model`. Raises Rejection(404) for an unknown model."""
        if rewrite:
            return Target(rewrite, rewrite in self._lora_targets)
        rule = self._rules.get(model)
        if rule is None:
            rule = self._catch_all
            if rule is None:
                if self._passthrough:
                    return Target(model, model in self._lora_targets)
                raise Rejection(404, "model_not_found", f"model '{model}' is not served by this pool")
        return rule.choose(self._rng) or Target(model, model in self._lora_targets)

    def priority(self, objective: str | None) -> int:
        if not objective:
            return self._default_priority
        return self._priorities.get(objective, self._default_priority)
