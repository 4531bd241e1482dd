"""Configuration: embedded defaults, file + flag layering, and errors that name the key."""

from __future__ import annotations

import pytest

from epp.cli import main
from epp.config import ConfigError, build_config, load_config


def test_embedded_defaults_load_and_match_upstream_ports() -> None:
    config = load_config()
    assert (config.server.extproc_port, config.server.health_port, config.server.metrics_port) == (
        9002,
        9003,
        9090,
    )
    assert config.server.tls.enabled
    assert [s.type for s in config.scheduling.scorers][:3] == ["prefix-cache", "queue", "kv-cache"]


def test_file_then_overrides_layer_over_defaults(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pool:\n  endpoints: ['10.1.1.1:8000']\nlimits: {max_body_bytes: 4096}\n")
    config = load_config(path, {"limits": {"fallback_endpoints": 2}})
    assert [e.address for e in config.pool.endpoints] == ["10.1.1.1:8000"]
    assert config.limits.max_body_bytes == 4096 and config.limits.fallback_endpoints == 2
    assert config.server.extproc_port == 9002  # untouched default


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pool": {"endpoints": ["10.0.0.1"]}}, "pool.endpoints[0].address: '10.0.0.1' is not ip:port"),
        (
            {"pool": {"endpoints": ["10.0.0.1:70000"]}},
            "pool.endpoints[0].address: '10.0.0.1:70000' has an invalid port",
        ),
        (
            {"pool": {"endpoints": [{"address": "1.1.1.1:1", "engine": "tgi"}]}},
            "pool.endpoints[0].engine: Value error, unknown engine",
        ),
        ({"server": {"extproc_port": "x"}}, "server.extproc_port"),
        ({"server": {"tls": {"cert_file": "/a.pem"}}}, "cert_file and key_file must be given together"),
        ({"limits": {"max_body_bytes": 10}}, "limits.max_body_bytes"),
        (
            {"models": [{"name": "a", "targets": [{"model": "b", "weight": 0}]}]},
            "target weights must not all be 0",
        ),
        ({"objectives": [{"name": "x"}, {"name": "x"}]}, "duplicate name"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_config_names_the_key(data, message) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message.replace("Value error, ", "") in str(err.value)


def test_bad_yaml_and_missing_file_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_check_config_command_reports_unknown_plugin(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scheduling:\n  scorers: [{type: nope}]\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "scheduling.scorers[0]: unknown scorer type 'nope'" in err
    assert main(["check-config"]) == 0


def test_serve_with_invalid_flag_value_fails_before_binding(capsys) -> None:
    assert main(["serve", "--endpoints", "nonsense"]) == 2
    assert "pool.endpoints[0].address" in capsys.readouterr().err
