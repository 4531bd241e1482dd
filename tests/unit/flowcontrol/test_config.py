"""The `flow_control` section of the config: defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, build_config, load_config


def test_defaults() -> None:
    flow = load_config().flow_control
    assert flow.fairness == "round-robin"
    assert (flow.ttl_s, flow.no_endpoints_ttl_s, flow.buffered_wait_s) == (30.0, 5.0, 4.5)
    assert (flow.max_requests, flow.band_max_requests) == (2000, 1000)
    assert flow.band_max_bytes is not None and flow.band_max_bytes <= flow.max_bytes
    assert not flow.extend_message_timeout


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"fairness": "lottery"}, "flow_control.fairness"),
        ({"ttl_s": 0}, "flow_control.ttl_s"),
        ({"ttl_s": 2, "no_endpoints_ttl_s": 5}, "no_endpoints_ttl_s must not exceed ttl_s"),
        ({"max_requests": 10, "band_max_requests": 20}, "band_max_requests must not exceed max_requests"),
        ({"max_bytes": 2048, "band_max_bytes": 4096}, "band_max_bytes must not exceed max_bytes"),
        ({"max_requests": 0}, "flow_control.max_requests"),
        ({"queue": True}, "flow_control.queue"),
    ],
)
def test_invalid_values_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"flow_control": section})
    assert message in str(info.value)


def test_band_limits_may_be_switched_off() -> None:
    flow = build_config({"flow_control": {"band_max_requests": None, "band_max_bytes": None}}).flow_control
    assert flow.band_max_requests is None and flow.band_max_bytes is None
