"""Plugin registry: configuration errors name the offending `scheduling.*[i]` entry and the problem."""

from __future__ import annotations

import random
from typing import Any

import pytest

from epp.config import ConfigError, load_config
from epp.datalayer.endpoints import EndpointPool
from epp.scheduling.registry import PluginContext, available, build_scheduler, params_of, validate_plugins


def build(scheduling: dict[str, Any]) -> Any:
    config = load_config(None, {"scheduling": scheduling})
    return build_scheduler(PluginContext(config, EndpointPool(), random.Random(0)))


def error_of(scheduling: dict[str, Any]) -> str:
    config = load_config(None, {"scheduling": scheduling})
    with pytest.raises(ConfigError) as info:
        validate_plugins(config)
    return str(info.value)


def test_available_lists_the_builtins() -> None:
    names = available()
    assert names["filter"] == ["healthy"]
    assert names["picker"] == ["max-score", "weighted-random"]
    assert set(names["scorer"]) >= {"queue", "kv-cache", "lora-affinity", "inflight", "prefix-cache"}


def test_default_config_validates() -> None:
    validate_plugins(load_config())


def test_unknown_scorer_type_names_the_entry_and_lists_the_known_ones() -> None:
    message = error_of({"scorers": [{"type": "queue"}, {"type": "qeueu", "weight": 1}]})
    assert message.startswith("scheduling.scorers[1]:")
    assert "unknown scorer type 'qeueu'" in message
    assert "queue" in message.split("available:")[1]


def test_subset_hint_is_not_a_filter_any_more() -> None:
    # The director applies the gateway's subset before the filters; a config listing it gets a clear error.
    message = error_of({"filters": [{"type": "subset-hint"}, {"type": "healthy"}]})
    assert message.startswith("scheduling.filters[0]: unknown filter type 'subset-hint'")


def test_prefix_cache_index_settings_are_its_parameters() -> None:
    sched = build({"scorers": [{"type": "prefix-cache", "params": {"block_chars": 32, "max_blocks": 8}}]})
    scorer = sched.scorers[0][0]
    assert (scorer.block_chars, scorer.max_blocks) == (32, 8)
    assert error_of({"scorers": [{"type": "prefix-cache", "params": {"max_blocks": 0}}]}).startswith(
        "scheduling.scorers[0]: plugin 'prefix-cache': max_blocks must be >= 1"
    )


def test_unknown_filter_and_picker_types() -> None:
    assert error_of({"filters": [{"type": "nope"}]}).startswith("scheduling.filters[0]: unknown filter type")
    assert error_of({"picker": {"type": "fastest"}}).startswith("scheduling.picker: unknown picker type")


def test_unknown_parameter_names_entry_plugin_and_key() -> None:
    message = error_of({"scorers": [{"type": "kv-cache"}, {"type": "prefix-cache", "params": {"gap": 3}}]})
    assert message.startswith("scheduling.scorers[1]:")
    assert "prefix-cache" in message and "'gap'" in message and "load_gap" in message


def test_parameter_on_a_plugin_that_takes_none() -> None:
    message = error_of({"scorers": [{"type": "queue", "params": {"depth": 1}}]})
    assert message.startswith("scheduling.scorers[0]:")
    assert "unknown parameter" in message and "none" in message


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"load_gap": "four"}, "'load_gap' must be float"),
        ({"load_gap": True}, "'load_gap' must be float"),
        ({"load_gap": -1}, "load_gap must be >= 0"),
    ],
)
def test_wrong_parameter_type_or_value(params: dict[str, Any], fragment: str) -> None:
    message = error_of(
        {"scorers": [{"type": "queue"}, {"type": "kv-cache"}, {"type": "prefix-cache", "params": params}]}
    )
    assert message.startswith("scheduling.scorers[2]:")
    assert fragment in message


def test_inflight_mode_must_be_known() -> None:
    message = error_of({"scorers": [{"type": "inflight", "params": {"mode": "bytes"}}]})
    assert message.startswith("scheduling.scorers[0]:")
    assert "requests, tokens or both" in message


def test_int_accepted_for_float_parameter() -> None:
    sched = build({"scorers": [{"type": "prefix-cache", "params": {"load_gap": 2}}]})
    scorer = sched.scorers[0][0]
    assert scorer.load_gap == 2.0 and isinstance(scorer.load_gap, float)


def test_parameters_reach_the_plugins() -> None:
    sched = build(
        {
            "scorers": [
                {"type": "lora-affinity", "weight": 1.5, "params": {"free_slot": 0.5, "waiting": 0.25}},
                {"type": "inflight", "params": {"mode": "tokens"}},
            ],
            "picker": {"type": "weighted-random"},
        }
    )
    lora, weight = sched.scorers[0]
    assert (lora.free_slot, lora.waiting, weight) == (0.5, 0.25, 1.5)
    assert sched.scorers[1][0].mode == "tokens"
    assert sched.picker.name == "weighted-random"


def test_negative_weight_is_rejected_by_the_config_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"scheduling": {"scorers": [{"type": "queue", "weight": -1}]}})
    assert "scheduling.scorers[0].weight" in str(info.value)


def test_params_of_merges_defaults() -> None:
    assert params_of({"b": 2.5}, "p", a="x", b=1.0) == {"a": "x", "b": 2.5}
    with pytest.raises(ConfigError, match="'a' must be str"):
        params_of({"a": 1}, "p", a="x")
