"""The simulator's settings: one `FleetConfig` for the fleet, and the `EngineConfig` it hands each engine.

Settings flow down in one object per layer: the CLI builds its parser from `FleetConfig`'s fields
(`cli.build_parser`), `SimFleet` and every `Replica` take the `FleetConfig`, and each replica's `Engine`
takes the `EngineConfig` derived from it (`FleetConfig.engine_config()`).

`DEFAULT_MODEL` is the one place the default model name lives; the load generator, the benchmarks and the
tests import it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp_lab.sim.profiles import DEFAULT_PROFILE, PROFILES, LatencyProfile, get_profile

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""The base model a simulated replica serves unless told otherwise (also the prefix hashes' seed)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What one replica's engine needs: its latency profile and sizes. `None` sizes are the profile's."""

    profile: LatencyProfile = field(default_factory=lambda: PROFILES[DEFAULT_PROFILE])
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_lora: int = 4
    kv_events: bool = False  # collect vLLM-style KV-cache events for the driver to publish


def _cli(
    help: str,
    parse: Callable[[str], Any] | None = None,
    *,
    default: Any = None,
    choices: list[str] | None = None,
) -> dict[str, Any]:
    """Field metadata for `cli.build_parser`: help text, the argument's type, and a CLI default that differs
    from the dataclass's (the CLI serves a 4-replica fleet on fixed ports, the library one ephemeral port)."""
    meta: dict[str, Any] = {"help": help, "parse": parse}
    if default is not None:
        meta["cli_default"] = default
    if choices is not None:
        meta["choices"] = choices
    return meta


def _adapter_list(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@dataclass(slots=True)
class FleetConfig:
    """Everything that shapes a simulated fleet. `None` sizes come from the latency profile.

    `base_port` 0 gives every replica its own ephemeral port; otherwise replicas use consecutive ports.
    `time_scale` multiplies every simulated duration (0.1 = ten times faster than real time).
    """

    replicas: int = field(
        default=1, metadata=_cli("replicas, one port each (4 = the picker's default pool)", int, default=4)
    )
    host: str = field(default="127.0.0.1", metadata=_cli("address to listen on"))
    base_port: int = field(
        default=0,
        metadata=_cli(
            "port of the first replica; the others use the following ports. 0 = an ephemeral port per "
            "replica (see --ready-file and the printed addresses)",
            int,
            default=8100,
        ),
    )
    model: str = field(default=DEFAULT_MODEL, metadata=_cli("base model name served (and the hash seed)"))
    lora_adapters: tuple[str, ...] = field(
        default=(),
        metadata=_cli(
            "comma-separated LoRA adapter names also served (requests name them in 'model')",
            _adapter_list,
            default="",
        ),
    )
    max_lora: int = field(default=4, metadata=_cli("resident LoRA adapter slots per replica", int))
    profile: str = field(
        default=DEFAULT_PROFILE,
        metadata=_cli(
            "latency profile (prefill/decode/LoRA costs, default KV size; see epp_lab/sim/profiles.py: "
            + ", ".join(sorted(PROFILES))
            + "); a comma-separated list gives each replica its own (a mixed fleet), one name per replica",
        ),
    )
    num_gpu_blocks: int | None = field(
        default=None,
        metadata=_cli("KV-cache blocks of 16 tokens per replica (default: the profile's)", int),
    )
    max_num_seqs: int | None = field(
        default=None, metadata=_cli("max running requests per replica (default: 256)", int)
    )
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata=_cli("token budget of one engine step, chunked prefill (default: 8192)", int),
    )
    time_scale: float = field(
        default=1.0,
        metadata=_cli("real seconds per simulated second (0.1 = ten times faster than real time)", float),
    )
    seed: int = field(default=0, metadata=_cli("seed of the generated output text", int))
    stream_interval: int = field(
        default=1,
        metadata=_cli("tokens per SSE event (first and last tokens are always sent at once)", int),
    )
    kv_events_port_offset: int = field(
        default=0,
        metadata=_cli(
            "publish vLLM-style KV-cache events (ZMQ PUB, msgpack) on each replica's port + this offset, "
            "and answer replay requests on the port after it (0 = no events); see epp_lab/sim/kvevents.py",
            int,
        ),
    )

    def __post_init__(self) -> None:
        self.lora_adapters = tuple(self.lora_adapters)
        problems = []
        if self.replicas < 1:
            problems.append(f"replicas must be >= 1 (got {self.replicas})")
        if not 0 <= self.base_port <= 65535 or (
            self.base_port and self.base_port + self.replicas - 1 > 65535
        ):
            problems.append(f"base_port {self.base_port} + {self.replicas} replicas is outside 0..65535")
        profiles = self.profile.split(",")
        for name in profiles:
            if name not in PROFILES:
                problems.append(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}")
        if len(profiles) not in (1, self.replicas):
            problems.append(f"{len(profiles)} profiles for {self.replicas} replicas: give one, or one each")
        if self.max_lora < 1:
            problems.append(f"max_lora must be >= 1 (got {self.max_lora})")
        if self.model in self.lora_adapters:
            problems.append(f"LoRA adapter {self.model!r} has the base model's name")
        for name, value in (
            ("num_gpu_blocks", self.num_gpu_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (got {value})")
        if not self.time_scale > 0:
            problems.append(f"time_scale must be > 0 (got {self.time_scale})")
        if self.kv_events_port_offset and not (
            self.base_port == 0 or 0 < self.base_port + self.kv_events_port_offset <= 65534 - self.replicas
        ):
            problems.append(f"kv_events_port_offset {self.kv_events_port_offset} puts ports outside 1..65535")
        if self.stream_interval < 1:
            problems.append(f"stream_interval must be >= 1 (got {self.stream_interval})")
        if problems:
            raise ValueError("invalid simulator config: " + "; ".join(problems))

    def engine_config(self, replica: int = 0) -> EngineConfig:
        """The settings of replica number `replica`'s engine (they differ only in a mixed fleet's profile)."""
        profiles = self.profile.split(",")
        return EngineConfig(
            profile=get_profile(profiles[replica % len(profiles)]),
            num_gpu_blocks=self.num_gpu_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_lora=self.max_lora,
            kv_events=bool(self.kv_events_port_offset),
        )
