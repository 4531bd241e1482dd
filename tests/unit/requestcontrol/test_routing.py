"""Model-name routing (exact beats catch-all, weighted splits, 404) and objective priorities."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.config import build_config
from epp.errors import Rejection
from epp.requestcontrol.routing import ModelRouter


def router(**data) -> ModelRouter:
    return ModelRouter(build_config(data), random.Random(1))


def test_no_rules_passes_every_model_through() -> None:
    assert router().resolve("anything").model == "anything"


def test_exact_match_beats_catch_all_and_unknown_is_404_without_one() -> None:
    r = router(
        models=[
            {"name": "llama", "targets": [{"model": "llama-v2"}]},
            {"name": "*", "targets": [{"model": "default"}]},
        ]
    )
    assert r.resolve("llama").model == "llama-v2"
    assert r.resolve("other").model == "default"
    strict = router(models=[{"name": "llama"}])
    assert strict.resolve("llama").model == "llama"  # no targets: unchanged
    with pytest.raises(Rejection) as err:
        strict.resolve("gpt-4")
    assert err.value.status == 404 and "gpt-4" in err.value.message


def test_weighted_canary_split() -> None:
    r = router(
        models=[
            {"name": "m", "targets": [{"model": "stable", "weight": 90}, {"model": "canary", "weight": 10}]}
        ]
    )
    counts = Counter(r.resolve("m").model for _ in range(5000))
    assert 0.07 < counts["canary"] / 5000 < 0.13


def test_lora_targets_are_marked_and_rewrite_header_wins() -> None:
    r = router(models=[{"name": "sql", "targets": [{"model": "sql-lora-v3", "lora": True}]}])
    target = r.resolve("sql")
    assert (target.model, target.lora) == ("sql-lora-v3", True)
    assert r.resolve("sql", rewrite="sql-lora-v4").model == "sql-lora-v4"


def test_objective_priorities() -> None:
    r = router(
        objectives=[{"name": "batch", "priority": -1}, {"name": "chat", "priority": 5}], default_priority=1
    )
    assert (r.priority("batch"), r.priority("chat"), r.priority(None), r.priority("unknown")) == (-1, 5, 1, 1)
