"""Model-name routing: client-facing model → target model (weighted rewrites), and objective → priority.

Rule lookup: an exact `name` match wins over the catch-all rule `"*"`. With no rules configured every name
passes through unchanged; with rules but neither a match nor a catch-all, the model is unknown (404).
A pre-set target in header `x-gateway-model-name-rewrite` overrides the rules.

Rules and objectives can change while serving (`ModelRouter.update`, fed from the cluster's
InferenceModelRewrite / InferenceObjective objects): the cluster's entry wins over the config's for the same
model name (the catch-all `"*"` included) or objective name; the config's entries fill in the rest. Whether
an unknown name is a 404 is decided by the config alone (`models` given, no catch-all): cluster rules only
add names. A cluster target is a LoRA adapter when the config marks that model `lora: true` anywhere.
Each update swaps one immutable table, so a request sees either the old rules or the new ones.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from epp.config import Config, ModelRule, Objective, TargetModel
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


@dataclass(slots=True, frozen=True)
class _Table:
    """Everything a lookup reads, replaced as a whole by `ModelRouter.update`."""

    rules: dict[str, _WeightedTargets] = field(default_factory=dict)
    catch_all: _WeightedTargets | None = None
    lora_targets: frozenset[str] = frozenset()
    priorities: dict[str, int] = field(default_factory=dict)


class ModelRouter:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random(config.scheduling.seed)
        self._config_models = config.models
        self._config_objectives = config.objectives
        self._config_lora = frozenset(t.model for rule in config.models for t in rule.targets if t.lora)
        self._passthrough = not config.models
        self._default_priority = config.default_priority
        self._table = _Table()
        self.update()

    def update(self, models: Sequence[ModelRule] = (), objectives: Sequence[Objective] = ()) -> None:
        """Apply the cluster's rules and objectives (replacing the previous ones) over the config's."""
        cluster_rules = {rule.name: self._mark_lora(rule) for rule in models}
        merged = {rule.name: rule for rule in self._config_models} | cluster_rules
        rules = {name: _WeightedTargets(rule) for name, rule in merged.items()}
        priorities = {o.name: o.priority for o in self._config_objectives}
        priorities |= {o.name: o.priority for o in objectives}
        self._table = _Table(
            rules=rules,
            catch_all=rules.pop(CATCH_ALL, None),
            lora_targets=frozenset(t.model for rule in merged.values() for t in rule.targets if t.lora),
            priorities=priorities,
        )

    def _mark_lora(self, rule: ModelRule) -> ModelRule:
        """A cluster rule's targets are LoRA adapters where the config says so for the same model."""
        targets = tuple(
            TargetModel(model=t.model, weight=t.weight, lora=t.lora or t.model in self._config_lora)
            for t in rule.targets
        )
        return ModelRule(name=rule.name, targets=targets)

    def resolve(self, model: str, rewrite: str | None = None) -> Target:
        """The target for `model`. Raises Rejection(404) for an unknown model."""
        table = self._table
        if rewrite:
            return Target(rewrite, rewrite in table.lora_targets)
        rule = table.rules.get(model)
        if rule is None:
            rule = table.catch_all
            if rule is None:
                if self._passthrough:
                    return Target(model, model in table.lora_targets)
                raise Rejection(404, "model_not_found", f"model '{model}' is not served by this pool")
        return rule.choose(self._rng) or Target(model, model in table.lora_targets)

    def priority(self, objective: str | None) -> int:
        if not objective:
            return self._default_priority
        return self._table.priorities.get(objective, self._default_priority)
