"""The one configuration model. Every default of the service lives in this file.

Built once at start-up from the embedded defaults, an optional YAML file and command-line overrides
(`load_config`), validated, then passed down read-only. A bad value fails start-up with a `ConfigError`
naming the key path and the problem, e.g. ``scheduling.scorers[1].weight: must be >= 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from epp.datastore.endpoints import ENGINES, parse_address

# Defaults (upstream GIE values unless said otherwise).
EXTPROC_PORT = 9002
HEALTH_PORT = 9003  # gRPC health + our admin API (plaintext, like upstream's health port)
METRICS_PORT = 9090
MAX_BODY_BYTES = 16 * 1024 * 1024  # ours: generous for 32k-token prompts with images as URLs
BODY_CHUNK_BYTES = 62_000  # Envoy limits a streamed_response chunk to ~64 KiB
DEFAULT_MODEL_SERVER_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    """TLS on the ext_proc port. Enabled by default with a self-signed certificate made at start-up,
    as upstream does (Envoy AI Gateway dials TLS without verifying). Give both files to use your own."""

    enabled: bool = True
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"  # 0.0.0.0 in the Kubernetes manifests
    extproc_port: int = Field(EXTPROC_PORT, ge=0, le=65535)
    health_port: int = Field(HEALTH_PORT, ge=0, le=65535)
    metrics_port: int = Field(METRICS_PORT, ge=0, le=65535)
    tls: TLSConfig = TLSConfig()
    grace_period_s: float = Field(10.0, ge=0)  # in-flight streams may finish within this on shutdown
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class EndpointConfig(_Strict):
    address: str  # ip:port
    engine: str = "vllm"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value.strip()

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; expected one of {', '.join(ENGINES)}")
        return value


class KubernetesConfig(_Strict):
    """Where to find the InferencePool to follow (`pool.discovery: kubernetes`). In-cluster defaults: the
    API server from KUBERNETES_SERVICE_HOST/PORT, the service account's token, CA and namespace."""

    inference_pool: str = ""  # name of the InferencePool (inference.networking.k8s.io/v1)
    namespace: str | None = None  # default: the pod's own namespace
    api_server: str | None = None  # e.g. https://10.0.0.1:443; default: in-cluster
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    namespace_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PoolConfig(_Strict):
    """The model-server replicas. `static` lists them here (local runs, tests); `kubernetes` follows an
    InferencePool: its selector's Ready pods × its target ports (see deploy/)."""

    name: str = "default-pool"
    discovery: Literal["static", "kubernetes"] = "static"
    endpoints: tuple[EndpointConfig, ...] = ()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _kubernetes_needs_a_pool(self) -> PoolConfig:
        if self.discovery == "kubernetes" and not self.kubernetes.inference_pool:
            raise ValueError("discovery 'kubernetes' needs kubernetes.inference_pool (an InferencePool name)")
        return self

    @field_validator("endpoints", mode="before")
    @classmethod
    def _strings_allowed(cls, value: Any) -> Any:
        # Accept plain "ip:port" strings as shorthand for {address: ip:port}.
        if isinstance(value, list | tuple):
            return [{"address": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _unique(self) -> PoolConfig:
        seen: set[str] = set()
        for endpoint in self.endpoints:
            if endpoint.address in seen:
                raise ValueError(f"endpoint {endpoint.address} is listed twice")
            seen.add(endpoint.address)
        return self


class TargetModel(_Strict):
    model: str = Field(min_length=1)
    weight: int = Field(1, ge=0)
    lora: bool = False  # the target is a LoRA adapter name (scored for adapter residency)


class ModelRule(_Strict):
    """Client-facing model name (exact, or "*" for every other name) → weighted target models.

    No targets means the name passes through unchanged. Weights split traffic (canary: 90/10)."""

    name: str = Field(min_length=1)
    targets: tuple[TargetModel, ...] = ()

    @model_validator(mode="after")
    def _weights(self) -> ModelRule:
        if self.targets and sum(t.weight for t in self.targets) == 0:
            raise ValueError("target weights must not all be 0")
        return self


class Objective(_Strict):
    """Named priority, chosen per request by header `x-gateway-inference-objective`. Negative = sheddable."""

    name: str = Field(min_length=1)
    priority: int = 0


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    body_chunk_bytes: int = Field(BODY_CHUNK_BYTES, ge=1024, le=65_000)
    # Extra endpoints after the chosen one in the destination header, for Envoy's override_host policy.
    fallback_endpoints: int = Field(0, ge=0, le=16)


class PluginConfig(_Strict):
    """A scheduling plugin by registered type name, with its weight (scorers) and parameters."""

    type: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class SaturationConfig(_Strict):
    """Pool saturation = mean over endpoints of max(waiting / queue_threshold, kv_usage / kv_threshold);
    an endpoint whose metrics are stale counts as fully saturated (1.0). Stale = older than
    max(metrics_staleness_s, 3 x the scrape period), so a stretched scrape period (big pools) is not
    mistaken for dead metrics."""

    queue_threshold: float = Field(5.0, gt=0)
    kv_threshold: float = Field(0.8, gt=0, le=1)
    metrics_staleness_s: float = Field(0.2, gt=0)


class PrefixConfig(_Strict):
    block_chars: int = Field(64, ge=4)  # 16 tokens x ~4 chars
    max_blocks: int = Field(256, ge=1)  # blocks hashed and matched per request
    capacity_blocks: int = Field(31_250, ge=1)  # per endpoint, when the server exports no cache shape
    auto_capacity: bool = True  # size per endpoint from the server's cache_config_info when exported


class ScrapeConfig(_Strict):
    interval_s: float = Field(0.05, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    path: str = "/metrics"
    # Scraping budget of the whole pool (~0.15 ms of CPU per scrape of a 32 KB vLLM page, on the event loop
    # the request path shares): beyond it each endpoint's period stretches to endpoints /
    # max_scrapes_per_second (64 endpoints: 0.128 s; 256: 0.512 s). Ours, not upstream's (every 50 ms):
    # the picker's own in-flight counts cover the bursts between scrapes. null: no cap.
    max_scrapes_per_second: float | None = Field(500.0, gt=0)

    def period(self, endpoints: int) -> float:
        """Seconds between two scrapes of one endpoint in a pool of `endpoints`."""
        if self.max_scrapes_per_second is None:
            return self.interval_s
        return max(self.interval_s, endpoints / self.max_scrapes_per_second)


class SchedulingConfig(_Strict):
    """One profile: filters, then weighted scorers, then a picker. Plugin types are listed by
    `epp plugins`; defaults chosen by the routing benchmark (see benchmarks/README.md)."""

    filters: tuple[PluginConfig, ...] = ()
    scorers: tuple[PluginConfig, ...] = ()
    picker: PluginConfig = PluginConfig(type="max-score")
    prefix: PrefixConfig = PrefixConfig()
    saturation: SaturationConfig = SaturationConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    seed: int | None = None  # random tie-breaks; None = nondeterministic


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    pool: PoolConfig = PoolConfig()
    models: tuple[ModelRule, ...] = ()
    objectives: tuple[Objective, ...] = ()
    default_priority: int = 0
    limits: LimitsConfig = LimitsConfig()
    scheduling: SchedulingConfig = SchedulingConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for label, names in (
            ("models", [m.name for m in self.models]),
            ("objectives", [o.name for o in self.objectives]),
        ):
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"{label}: duplicate name(s) {sorted(dupes)}")
        return self


DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in `override` replace those in `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(top level)'}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Embedded defaults ← YAML file (if any) ← overrides (nested dict from flags)."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()) or {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = _merge(data, loaded)
    if overrides:
        data = _merge(data, overrides)
    return build_config(data)
