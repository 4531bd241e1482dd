"""InferenceObjective / InferenceModelRewrite objects → model rules and priorities (the CRD's precedence),
and `ModelRouter.update` merging them over the config (the cluster's entry wins per name)."""

from __future__ import annotations

import random

import pytest
from support.kube_api import LLMD_ALPHA, make_objective, make_rewrite

from epp.config import build_config
from epp.datalayer.discovery.objectives import merge_objectives, merge_rewrites
from epp.errors import Rejection
from epp.requestcontrol.routing import ModelRouter

OLD, NEW = "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"


def rules(*objs: dict, orders: list[int] | None = None) -> dict[str, list[tuple[str, int]]]:
    pairs = list(zip(orders or [0] * len(objs), objs, strict=True))
    return {r.name: [(t.model, t.weight) for t in r.targets] for r in merge_rewrites(pairs, "llama")}


def test_exact_match_beats_catch_all_and_the_oldest_object_wins() -> None:
    newer = make_rewrite("newer", [(["llama"], [("v3", None)]), ([], [("fallback-new", None)])], created=NEW)
    older = make_rewrite("older", [(["llama", "mistral"], [("v2", 90), ("v2-canary", 10)])], created=OLD)
    catch_all = make_rewrite("catch", [([], [("fallback-old", None)])], created=OLD)
    assert rules(newer, older, catch_all) == {
        "llama": [("v2", 90), ("v2-canary", 10)],
        "mistral": [("v2", 90), ("v2-canary", 10)],
        "*": [("fallback-old", 1)],
    }


def test_first_rule_wins_within_an_object_and_unset_weights_are_equal() -> None:
    one = make_rewrite("one", [(["m"], [("a", None), ("b", None)]), (["m"], [("c", None)])])
    assert rules(one) == {"m": [("a", 1), ("b", 1)]}


def test_other_pools_are_ignored_and_a_rule_without_targets_passes_through() -> None:
    other = make_rewrite("other", [(["m"], [("x", None)])], pool="mistral")
    bare = make_rewrite("bare", [(["n"], [])])
    assert rules(other, bare) == {"n": []}


def test_objectives_by_name_oldest_wins_then_group_order() -> None:
    a_new = make_objective("interactive", 10, created=NEW)
    a_old = make_objective("interactive", 5, api=LLMD_ALPHA, created=OLD)
    batch_gie = make_objective("batch", -1, created=OLD)
    batch_llmd = make_objective("batch", -5, api=LLMD_ALPHA, created=OLD)
    unset = make_objective("default-ish", None)
    other = make_objective("elsewhere", 3, pool="mistral")
    objects = [(0, a_new), (1, a_old), (0, batch_gie), (1, batch_llmd), (0, unset), (0, other)]
    merged = merge_objectives(objects, "llama")
    assert {o.name: o.priority for o in merged} == {"interactive": 5, "batch": -1, "default-ish": 0}


def router(**data: object) -> ModelRouter:
    return ModelRouter(build_config(data), random.Random(1))


def test_update_applies_cluster_rules_over_the_config() -> None:
    r = router(
        models=[{"name": "llama", "targets": [{"model": "llama-v1"}]},
                {"name": "adapter", "targets": [{"model": "sql-lora", "lora": True}]}],
        objectives=[{"name": "batch", "priority": -1}, {"name": "chat", "priority": 5}],
    )  # fmt: skip
    assert r.resolve("llama").model == "llama-v1"
    with pytest.raises(Rejection):
        r.resolve("mistral")  # config has rules and no catch-all: unknown names are 404

    cluster_rules = merge_rewrites(
        [(0, make_rewrite("rw", [(["llama"], [("llama-v2", None)]), (["mistral"], [("sql-lora", None)])]))],
        "llama",
    )
    r.update(cluster_rules, merge_objectives([(0, make_objective("batch", 10))], "llama"))
    assert r.resolve("llama").model == "llama-v2"  # the cluster wins for the same name
    assert r.resolve("mistral") == r.resolve("mistral")  # now known
    assert r.resolve("mistral").lora  # marked LoRA by the config's own rule for that model
    assert r.resolve("adapter").model == "sql-lora"  # config rules the cluster does not name stay
    assert (r.priority("batch"), r.priority("chat"), r.priority(None)) == (10, 5, 0)

    r.update()  # the cluster's objects are gone: back to the config alone
    assert r.resolve("llama").model == "llama-v1" and r.priority("batch") == -1


def test_cluster_rules_never_make_a_passthrough_config_strict() -> None:
    r = router()
    r.update(merge_rewrites([(0, make_rewrite("rw", [(["llama"], [("v2", None)])]))], "llama"), [])
    assert r.resolve("llama").model == "v2"
    assert r.resolve("anything-else").model == "anything-else"
