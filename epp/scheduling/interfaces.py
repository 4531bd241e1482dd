"""The scheduling contract: a request, per-request plugin state, candidate endpoints, the three plugin kinds
and the request-lifecycle hooks a plugin may implement.

A profile runs `filters` (each narrows the candidate list), then weighted `scorers` (each returns one score
in [0, 1] per candidate, aligned with the list it was given), then one `picker` that orders the candidates by
their weighted total and returns the primary endpoint followed by fallbacks. Plugins are synchronous and do
no I/O: everything they need is on the request, in their own state or on the endpoints (data layer).

What a plugin derives for one request (e.g. the prompt's block hashes) goes in the request's `CycleState`
under the plugin's name, never on the request itself: the state lives from the decision to the end of the
request, so a plugin's lifecycle hooks see what its scorer computed.

Lifecycle hooks (optional, found by `isinstance` on the protocol), called by the request director:

    pre_request        the request was sent to `endpoint` (after the decision reply left; again with the
                       served endpoint if the gateway reports that another one served it)
    response_started   the first response byte from `endpoint` arrived (the time to first token)
    response_complete  the request's stream ended, for any reason
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from epp.datalayer.endpoints import Endpoint


@dataclass(slots=True)
class SchedulingRequest:
    """What the scheduler knows about one inference request (parsed once from headers and body)."""

    request_id: str
    model: str  # the client-facing name from the body
    target_model: str  # after rewrite rules: what the model server will be asked for
    prompt: str = ""  # text that identifies the prompt for prefix matching (chat: serialized messages)
    prompt_tokens: int = 0  # estimate (characters / 4)
    max_tokens: int = 0  # requested output tokens (0 = unknown)
    lora_adapter: str | None = None  # target_model when it names a LoRA adapter, else None
    cache_salt: str = ""
    priority: int = 0  # from the objective; < 0 is sheddable
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False  # the client asked for a streamed (SSE) response
    fairness_id: str = "default-flow"  # the tenant, for flow control (x-llm-d-inference-fairness-id)
    slo_ttft_s: float | None = None  # objectives from x-llm-d-slo-ttft-ms / -tpot-ms, in seconds
    slo_tpot_s: float | None = None

    @property
    def estimated_tokens(self) -> int:
        """Tokens this request will occupy on a server: prompt plus requested output."""
        return self.prompt_tokens + self.max_tokens


class CycleState(dict[str, Any]):
    """Per-request scratch space of the plugins, keyed by plugin name (a plugin reads and writes only its
    own key). Created by the director for each request; discarded when the request ends."""

    __slots__ = ()


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(
        self, request: SchedulingRequest, state: CycleState, candidates: list[Endpoint]
    ) -> list[Endpoint]:
        """Return the candidates that remain eligible (a subset, order kept)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        """One score in [0, 1] per candidate, higher is better."""
        ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self,
        request: SchedulingRequest,
        state: CycleState,
        candidates: Sequence[Endpoint],
        totals: Sequence[float],
        count: int,
    ) -> list[Endpoint]:
        """Up to `count` distinct endpoints, the chosen one first, then fallbacks in order of preference."""
        ...


@runtime_checkable
class Explains(Protocol):
    """Optional: what a plugin can say about its last `score` for `epp explain` (e.g. the prompt's prefix
    blocks, each candidate's predicted latency and its parts). Called only when explaining."""

    def explain(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """(request-level details, one dict of details per candidate)."""
        ...


@runtime_checkable
class PreRequest(Protocol):
    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None: ...


@runtime_checkable
class ResponseStarted(Protocol):
    def response_started(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, seconds: float
    ) -> None:
        """`seconds` from the request's dispatch to its first response byte."""
        ...


@runtime_checkable
class ResponseComplete(Protocol):
    def response_complete(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, status: int
    ) -> None:
        """`status`: the upstream's HTTP status, or 0 when the stream ended without one (client gone)."""
        ...


@runtime_checkable
class Closes(Protocol):
    """Optional: background work a plugin owns (e.g. the KV-event subscriptions), stopped at shutdown after
    the in-flight streams have finished."""

    async def aclose(self) -> None: ...


@runtime_checkable
class EndpointDetails(Protocol):
    """Optional: per-endpoint numbers a plugin keeps (e.g. prefix-index blocks), for `epp endpoints`, and
    pool-level gauges for /metrics."""

    def endpoint_details(self, endpoint: Endpoint) -> dict[str, float]: ...

    def gauges(self) -> dict[str, float]: ...
