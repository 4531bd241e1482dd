"""The one configuration model. Every default of the service lives in this file.

Built once at start-up from these defaults, an optional YAML file and command-line overrides
(`load_config`), validated, then passed down read-only. A bad value fails start-up with a `ConfigError`
naming the key path and the problem, e.g. ``scheduling.scorers[1].weight: must be >= 0``.

A scheduling plugin's own parameters (e.g. the prefix-cache scorer's `load_gap`) are validated by the
plugin's `Params` model next to its code (`epp plugins` lists them); which plugins run, with which weights
and non-default parameters, is decided here (`DEFAULT_SCORERS`).

This module imports nothing from the rest of `epp`: every other package may read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Defaults (upstream GIE values unless said otherwise).
EXTPROC_PORT = 9002
HEALTH_PORT = 9003  # gRPC health (plaintext, like upstream's health port): what kubelet probes
ADMIN_PORT = 9004  # ours: the admin gRPC API (ListEndpoints, Explain), plaintext, localhost by default
METRICS_PORT = 9090
MAX_BODY_BYTES = 16 * 1024 * 1024  # ours: generous for 32k-token prompts with images as URLs
BODY_CHUNK_BYTES = 62_000  # Envoy limits a streamed_response chunk to ~64 KiB
# Ours: what clients can make the picker hold (LimitsConfig).
MAX_STREAMS = 10_000  # open ext_proc streams (Envoy's default circuit breaker: 1024 per gateway replica)
MAX_BUFFERED_BYTES = 1024 * 1024 * 1024  # request bodies being collected, all streams (pod limit: 4 GiB)
BODY_TIMEOUT_S = 60.0  # from a stream's start to the end of its request body
CHARS_PER_TOKEN = 4  # token estimate where no tokenizer is used: tokens = ceil(characters / 4)
# The local pool of `epp sim` (4 simulated vLLM replicas from port 8100): `epp sim` + `epp serve` just work.
LOCAL_ENDPOINTS = ("127.0.0.1:8100", "127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103")

# Model-server engines the picker can read metrics from (their metric names: epp/datalayer/engines.py).
Engine = Literal["vllm", "sglang", "trtllm-serve", "triton-trtllm"]
ENGINES: tuple[str, ...] = get_args(Engine)


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the problem."""


def parse_address(value: str) -> tuple[str, int]:
    """Split and validate `ip:port` (IPv6 as `[::1]:8000`). Raises ValueError with a readable reason."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not ip:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has an invalid port")
    return host, int(port_text)


class StrictModel(BaseModel):
    """Unknown keys are errors, values are read-only after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(StrictModel):
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


class ServerConfig(StrictModel):
    """Ports and shutdown. On SIGTERM: readiness NOT_SERVING (and the Lease released) at once, new ext_proc
    streams still accepted for `drain_s` (while the Service and the gateway stop sending them; skipped when
    this replica was not ready, e.g. a standby; a second signal ends it), then no new streams and
    `grace_period_s` for those in flight. Total at most drain_s + grace_period_s."""

    host: str = "127.0.0.1"  # ext_proc and health bind address; 0.0.0.0 in the Kubernetes manifests
    extproc_port: int = Field(EXTPROC_PORT, ge=0, le=65535)
    health_port: int = Field(HEALTH_PORT, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # /metrics bind address; 0.0.0.0 in the manifests (Prometheus)
    metrics_port: int = Field(METRICS_PORT, ge=0, le=65535)
    admin_host: str = "127.0.0.1"  # admin API bind address: inside the pod only (kubectl exec/port-forward)
    # Default: 9004, or any free port (0) when health_port is 0 (tests and scripts asking for free ports).
    admin_port: int = Field(ADMIN_PORT, ge=0, le=65535)
    # Bearer tokens (file holding the token; null = no token): requests without `authorization: Bearer
    # <token>` get 401 (/metrics) or UNAUTHENTICATED (admin API). Read once at start-up.
    admin_token_file: Path | None = None
    metrics_token_file: Path | None = None
    tls: TLSConfig = TLSConfig()
    drain_s: float = Field(5.0, ge=0)  # after SIGTERM, new streams are still accepted this long
    grace_period_s: float = Field(10.0, ge=0)  # then in-flight streams may finish within this
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _admin_port_follows_a_free_health_port(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("admin_port") is None and data.get("health_port") == 0:
            return {**data, "admin_port": 0}
        return data


class EndpointConfig(StrictModel):
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


class KubernetesConfig(StrictModel):
    """Where to find the InferencePool to follow (`pool.discovery: kubernetes`). In-cluster defaults: the
    API server from KUBERNETES_SERVICE_HOST/PORT, the service account's token, CA and namespace."""

    inference_pool: str = ""  # name of the InferencePool (inference.networking.k8s.io/v1)
    namespace: str | None = None  # default: the pod's own namespace
    api_server: str | None = None  # e.g. https://10.0.0.1:443; default: in-cluster
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path | None = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    namespace_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    # InferenceObjective / InferenceModelRewrite (v1alpha2) are read from these API group/versions, all
    # merged (GIE's group up to v1.5; the llm-d router's since). [] = none. See `models` in the README.
    objective_apis: tuple[str, ...] = ("inference.networking.x-k8s.io/v1alpha2", "llm-d.ai/v1alpha2")

    @field_validator("objective_apis")
    @classmethod
    def _group_versions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            group, sep, version = item.partition("/")
            if not sep or not group or not version or "/" in version:
                raise ValueError(f"{item!r} is not group/version, e.g. llm-d.ai/v1alpha2")
        return value


class LeaderElectionConfig(StrictModel):
    """Active-passive replicas: one Lease (coordination.k8s.io/v1) in the pod's namespace, held by the pod
    named $POD_NAME (else hostname + a random suffix). Only the holder reports readiness SERVING; every
    replica keeps discovery and scraping running. The API server is reached as `pool.kubernetes` says.

    As client-go: a standby takes a Lease whose holder has not renewed it for leaseDurationSeconds (timed by
    the standby's own clock from when it saw the record change), checking every `retry_period_s` (x1-1.2
    jitter); the leader renews every `retry_period_s` and steps down when it could not for
    `renew_deadline_s`. A stopping leader releases the Lease (empty holder): the standby takes it at its next
    check. Failover after a crash: at most lease_duration_s + retry_period_s x 1.2."""

    enabled: bool = False
    lease_name: str = Field("epp", min_length=1)
    namespace: str | None = None  # default: $POD_NAMESPACE, then pool.kubernetes.namespace_file
    lease_duration_s: int = Field(15, ge=1)  # the Lease's leaseDurationSeconds (an integer)
    renew_deadline_s: float = Field(10.0, gt=0)
    retry_period_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionConfig:
        if not self.lease_duration_s > self.renew_deadline_s > 1.2 * self.retry_period_s:
            raise ValueError("need lease_duration_s > renew_deadline_s > 1.2 x retry_period_s")
        return self


class PoolConfig(StrictModel):
    """The model-server replicas. `static` lists them here (local runs, tests); `kubernetes` follows an
    InferencePool: its selector's Ready pods × its target ports (see deploy/)."""

    name: str = "default-pool"
    discovery: Literal["static", "kubernetes"] = "static"
    endpoints: tuple[EndpointConfig, ...] = tuple(EndpointConfig(address=a) for a in LOCAL_ENDPOINTS)
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


class TargetModel(StrictModel):
    model: str = Field(min_length=1)
    weight: int = Field(1, ge=0)
    lora: bool = False  # the target is a LoRA adapter name (scored for adapter residency)


class ModelRule(StrictModel):
    """Client-facing model name (exact, or "*" for every other name) → weighted target models.

    No targets means the name passes through unchanged. Weights split traffic (canary: 90/10)."""

    name: str = Field(min_length=1)
    targets: tuple[TargetModel, ...] = ()

    @model_validator(mode="after")
    def _weights(self) -> ModelRule:
        if self.targets and sum(t.weight for t in self.targets) == 0:
            raise ValueError("target weights must not all be 0")
        return self


class Objective(StrictModel):
    """Named priority, chosen per request by header `x-llm-d-inference-objective` (or the older
    `x-gateway-inference-objective`). Negative = sheddable."""

    name: str = Field(min_length=1)
    priority: int = 0


class LimitsConfig(StrictModel):
    """What one client, or many, can make the picker hold (README "Security and threat model").

    A request body is collected (FULL_DUPLEX_STREAMED) up to `max_body_bytes` (413 beyond; a chunk past the
    limit is not kept); the bodies being collected by all streams together up to `max_buffered_bytes` (503
    `buffers_full` for the stream whose chunk would pass it); a stream gets `body_timeout_s` from its start
    to the end of its request body (408 `body_timeout`: a client dripping its body a few bytes at a time
    cannot hold a stream and its buffer longer); at most `max_streams` ext_proc streams are open at once
    (503 `too_many_streams` for the next one, answered on its first message). Requests held by flow control
    have their own limits (`flow_control.max_requests`, `max_bytes`, `ttl_s`)."""

    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    body_chunk_bytes: int = Field(BODY_CHUNK_BYTES, ge=1024, le=65_000)
    # Extra endpoints after the chosen one in the destination header, for Envoy's override_host policy.
    fallback_endpoints: int = Field(0, ge=0, le=16)
    max_streams: int = Field(MAX_STREAMS, ge=1)
    max_buffered_bytes: int = Field(MAX_BUFFERED_BYTES, ge=1024)
    body_timeout_s: float = Field(BODY_TIMEOUT_S, gt=0)

    @model_validator(mode="after")
    def _buffer_holds_one_body(self) -> LimitsConfig:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError("max_buffered_bytes must be at least max_body_bytes")
        return self


ControlHeader = Literal["objective", "fairness_id", "slo", "model_rewrite"]


class SecurityConfig(StrictModel):
    """Which control headers the picker honours (names: epp/requestcontrol/headers.py): `objective`
    (x-llm-d-inference-objective / x-gateway-inference-objective), `fairness_id`
    (x-llm-d-inference-fairness-id / x-gateway-...), `slo` (x-llm-d-slo-ttft-ms / -tpot-ms, x-slo-*),
    `model_rewrite` (x-llm-d-model-name-rewrite / x-gateway-...). The picker cannot tell who set a header:
    one not listed is ignored and removed from the request before it goes upstream. `model_rewrite` is off
    by default (a client could bypass the model rules); list it only when the gateway sets it and strips
    the client's copy."""

    trusted_control_headers: tuple[ControlHeader, ...] = ("objective", "fairness_id", "slo")


class ResponseConfig(StrictModel):
    """How far the picker follows each response (README: "Streamed responses: what the picker receives").

    `first-byte` (default): where Envoy lets the picker stop (response body mode STREAMED or BUFFERED), it
    stops following a response after its first body chunk: the time to the first token is observed, and every
    later chunk passes through Envoy without a gRPC message to the picker. A FULL_DUPLEX_STREAMED response
    must have every chunk echoed, so it is always followed to its end. `full`: follow every response to its
    end (a gRPC round trip per chunk, ~0.1 ms of picker CPU each).
    """

    follow: Literal["first-byte", "full"] = "first-byte"
    # In first-byte mode, follow every n-th request to its end anyway, for the picker's request-duration
    # histogram (0: never, the default: each followed 256-token stream costs ~25 ms of picker CPU, i.e.
    # ~1 ms per request at 1/64 measured; Envoy's own upstream_rq_time stats give every request's duration).
    full_sample_every: int = Field(0, ge=0)
    # When Envoy announces BUFFERED response bodies, ask it for STREAMED ones in the reply to the response
    # headers (`mode_override`, honoured only where the filter has allow_mode_override), so the first chunk
    # arrives when the model server sends it rather than with the whole response.
    streamed_override: bool = True


class PluginConfig(StrictModel):
    """A scheduling plugin by registered type name, with its weight (scorers) and parameters."""

    type: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class SaturationConfig(StrictModel):
    """Pool saturation = mean over endpoints of max(waiting / queue_threshold, kv_usage / kv_threshold);
    an endpoint whose metrics are stale counts as fully saturated (1.0). Stale = older than
    max(metrics_staleness_s, 3 x the scrape period), so a stretched scrape period (big pools) is not
    mistaken for dead metrics."""

    queue_threshold: float = Field(5.0, gt=0)
    kv_threshold: float = Field(0.8, gt=0, le=1)
    metrics_staleness_s: float = Field(0.2, gt=0)


class ScrapeConfig(StrictModel):
    interval_s: float = Field(0.05, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    path: str = "/metrics"
    # Scraping budget of the whole pool (~0.15 ms of CPU per scrape of a 32 KB vLLM page, on the event loop
    # the request path shares): beyond it each endpoint's period stretches to endpoints /
    # max_scrapes_per_second (64 endpoints: 0.128 s; 256: 0.512 s). Ours, not upstream's (every 50 ms):
    # the picker's own in-flight counts cover the bursts between scrapes. null: no cap.
    max_scrapes_per_second: float | None = Field(500.0, gt=0)
    max_backoff_s: float = Field(2.0, gt=0)  # failing endpoints are retried at most this far apart
    unreachable_after: int = Field(3, ge=1)  # consecutive failed scrapes before an endpoint is unreachable

    def period(self, endpoints: int) -> float:
        """Seconds between two scrapes of one endpoint in a pool of `endpoints`:
        max(interval_s, endpoints / max_scrapes_per_second)."""
        if self.max_scrapes_per_second is None:
            return self.interval_s
        return max(self.interval_s, endpoints / self.max_scrapes_per_second)


# The default scheduling profile, chosen by the routing benchmark (benchmarks/results/routing.tuning.md), not
# copied: upstream's 3/2/2 let a one-request load difference (min-max normalised queue + in-flight scores)
# outvote a full prefix match; prefix 6 keeps locality until the load guard (load_gap) says the warm replica
# is overloaded. LoRA: vLLM does not report idle resident adapters, so a "free slot" usually means loading
# the adapter there: it ranks below "adapter queued" (free_slot 0.4 < waiting 0.6).
DEFAULT_FILTERS = (PluginConfig(type="healthy"),)
DEFAULT_SCORERS = (
    PluginConfig(type="prefix-cache", weight=6, params={"load_gap": 4}),
    PluginConfig(type="queue", weight=2),
    PluginConfig(type="kv-cache", weight=2),
    PluginConfig(type="lora-affinity", weight=4, params={"free_slot": 0.4, "waiting": 0.6}),
    PluginConfig(type="inflight", weight=1),
)


class SchedulingConfig(StrictModel):
    """One profile: filters, then weighted scorers, then a picker (`epp plugins` lists the types). The
    gateway's subset hint is applied before the filters, by the request director."""

    filters: tuple[PluginConfig, ...] = DEFAULT_FILTERS
    scorers: tuple[PluginConfig, ...] = DEFAULT_SCORERS
    picker: PluginConfig = PluginConfig(type="max-score")
    saturation: SaturationConfig = SaturationConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    seed: int | None = None  # random tie-breaks; None = nondeterministic


class FlowControlConfig(StrictModel):
    """Flow control (epp/flowcontrol/): while the endpoints a request may use are saturated, the request
    waits in the picker instead of joining a model server's queue, and is dispatched (scheduled afresh) when
    capacity frees. Bands by priority, served in strict order; within a band, flows (one per fairness id)
    served fairly: `round-robin` (equal requests) or `token-weighted` (equal estimated tokens); FCFS within a
    flow. Sheddable requests (priority < 0) get 429 while the pool is saturated by the shedding rule
    (`scheduling.saturation`, as without flow control); short of that they wait like any other request,
    behind every higher band.

    Saturated = the saturation detector's formula (mean over the candidates of max(waiting / queue_threshold,
    kv / kv_threshold), stale metrics 1.0; staleness from `scheduling.saturation`) counting as waiting the
    picker's own dispatches since each endpoint's last scrape and its requests there not started yet (no
    first byte), with the gate's own thresholds `queue_threshold` / `kv_threshold` (1 / 0.9, chosen by
    benchmarks/flowcontrol; null: `scheduling.saturation`'s 5 / 0.8). They are tighter than the shedding
    thresholds on purpose: a request should wait here, where priority and fairness apply, rather than in a
    model server's first-come-first-served queue. Off by default: with every endpoint's metrics stale (a
    scrape problem), every request would wait and fail (503) instead of being routed blind.

    Limits (429 `queue_full`): `max_requests` / `max_bytes` (request bodies) over all bands,
    `band_max_requests` / `band_max_bytes` per band (null: only the overall limit). A request waits at most
    `ttl_s` (then 503 `queue_timeout`); while the pool has no endpoint at all, at most `no_endpoints_ttl_s`
    (then 503 `no_endpoints`; 0: at once). With a BUFFERED request body, Envoy's `message_timeout` bounds the
    picker's reply (5 s in envoy/buffered.yaml, Envoy's default 200 ms; past it Envoy answers 504 itself):
    such a request waits at most `buffered_wait_s`, which must stay below that timeout, unless
    `extend_message_timeout` is on: the picker then asks Envoy for `buffered_wait_s` + 1 s
    (`override_message_timeout`) when it queues one, which Envoy grants only up to
    the filter's `max_message_timeout` (unset: refused, with a warning per request)."""

    enabled: bool = False
    fairness: Literal["round-robin", "token-weighted"] = "round-robin"
    ttl_s: float = Field(30.0, gt=0)
    no_endpoints_ttl_s: float = Field(5.0, ge=0)
    buffered_wait_s: float = Field(4.5, gt=0)
    extend_message_timeout: bool = False
    queue_threshold: float | None = Field(1.0, gt=0)
    kv_threshold: float | None = Field(0.9, gt=0, le=1)
    max_requests: int = Field(2000, ge=1)
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    band_max_requests: int | None = Field(1000, ge=1)
    band_max_bytes: int | None = Field(256 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _consistent(self) -> FlowControlConfig:
        if self.no_endpoints_ttl_s > self.ttl_s:
            raise ValueError("no_endpoints_ttl_s must not exceed ttl_s")
        if self.band_max_requests is not None and self.band_max_requests > self.max_requests:
            raise ValueError("band_max_requests must not exceed max_requests")
        if self.band_max_bytes is not None and self.band_max_bytes > self.max_bytes:
            raise ValueError("band_max_bytes must not exceed max_bytes")
        return self


class Config(StrictModel):
    server: ServerConfig = ServerConfig()
    pool: PoolConfig = PoolConfig()
    models: tuple[ModelRule, ...] = ()
    objectives: tuple[Objective, ...] = ()
    default_priority: int = 0
    limits: LimitsConfig = LimitsConfig()
    security: SecurityConfig = SecurityConfig()
    response: ResponseConfig = ResponseConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    flow_control: FlowControlConfig = FlowControlConfig()
    leader_election: LeaderElectionConfig = LeaderElectionConfig()

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


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in `override` replace those in `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem: `key.path[index]: message` (pydantic's "Value error, " prefix dropped)."""
    lines = []
    for item in err.errors():
        path = prefix
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '(top level)'}: {message}")
    return "\n  ".join(lines)


def build_config(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid configuration:\n  " + format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults (this module) ← YAML file (if any) ← overrides (nested dict from flags)."""
    data: dict[str, Any] = {}
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
        data = merge(data, loaded)
    if overrides:
        data = merge(data, overrides)
    return build_config(data)
