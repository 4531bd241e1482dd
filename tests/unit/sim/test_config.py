"""The simulator's settings: the CLI built from `FleetConfig`'s fields, validation, the engine's share."""

from __future__ import annotations

import dataclasses

import pytest

from epp_lab.sim import cli
from epp_lab.sim.config import DEFAULT_MODEL, EngineConfig, FleetConfig
from epp_lab.sim.engine import Engine
from epp_lab.sim.profiles import PROFILES


def test_cli_defaults_and_flags_come_from_the_config_fields() -> None:
    args = cli.build_parser().parse_args([])
    config = cli.config_from_args(args)
    # The CLI serves a 4-replica fleet on 8100-8103 (the picker's default pool); the rest are the library's.
    assert (config.replicas, config.base_port) == (4, 8100)
    library = FleetConfig()
    for f in dataclasses.fields(FleetConfig):
        if f.name not in ("replicas", "base_port"):
            assert getattr(config, f.name) == getattr(library, f.name), f.name
    assert config.model == DEFAULT_MODEL and config.lora_adapters == () and args.ready_file is None

    args = cli.build_parser().parse_args(
        ["--lora-adapters", " sql, chat ,", "--num-gpu-blocks", "1200", "--time-scale", "0.25",
         "--profile", "a100-llama3-8b", "--stream-interval", "16"]
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert config.lora_adapters == ("sql", "chat")
    assert (config.num_gpu_blocks, config.time_scale, config.stream_interval) == (1200, 0.25, 16)


def test_cli_rejects_an_unknown_profile_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--profile", "tpu-v9"]) == 2
    assert "unknown profile 'tpu-v9'; known: a100-llama3-8b" in capsys.readouterr().err


def test_invalid_settings_are_listed_together() -> None:
    with pytest.raises(ValueError) as err:
        FleetConfig(replicas=0, max_lora=0, time_scale=0, lora_adapters=(DEFAULT_MODEL,))
    message = str(err.value)
    for part in ("replicas must be >= 1", "max_lora must be >= 1", "time_scale must be > 0", "base model"):
        assert part in message


def test_cli_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--replicas", "0"]) == 2
    assert "replicas must be >= 1" in capsys.readouterr().err


def test_engine_takes_the_fleet_settings_and_the_profile_fills_the_rest() -> None:
    config = FleetConfig(profile="a100-llama3-8b", num_gpu_blocks=1200, max_lora=2)
    engine = Engine(config.engine_config())
    profile = PROFILES["a100-llama3-8b"]
    assert engine.profile is profile
    assert (engine.num_gpu_blocks, engine.max_lora) == (1200, 2)
    assert engine.max_num_seqs == profile.max_num_seqs
    assert engine.max_num_batched_tokens == profile.max_num_batched_tokens
    default = Engine(EngineConfig())
    assert default.profile is PROFILES["h100-llama3-8b"] and default.num_gpu_blocks == 25_000


def test_a_mixed_fleet_gives_each_replica_its_own_profile() -> None:
    config = FleetConfig(replicas=4, profile="h100-llama3-8b,h100-llama3-8b,a100-llama3-8b,a100-llama3-8b")
    names = [config.engine_config(i).profile.name for i in range(4)]
    assert names == ["h100-llama3-8b", "h100-llama3-8b", "a100-llama3-8b", "a100-llama3-8b"]
    with pytest.raises(ValueError, match="2 profiles for 4 replicas"):
        FleetConfig(replicas=4, profile="h100-llama3-8b,a100-llama3-8b")
    with pytest.raises(ValueError, match="unknown profile 'b200'"):
        FleetConfig(replicas=2, profile="h100-llama3-8b,b200")
