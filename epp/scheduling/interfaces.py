"""The scheduling contract: a request, candidate endpoints, and the three plugin kinds.

A profile runs `filters` (each narrows the candidate list), then weighted `scorers` (each returns one score
in [0, 1] per candidate, aligned with the list it was given), then one `picker` that orders the candidates by
their weighted total and returns the primary endpoint followed by fallbacks. Plugins are synchronous and do
no I/O: everything they need is on the request or the endpoints (datastore).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from epp.datastore.endpoints import Endpoint


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
    # Gateway subset hint: only these addresses may be picked (None = no hint; empty = none allowed).
    subset: frozenset[str] | None = None
    # Per-request scratch for plugins that derive something expensive once (e.g. prefix block hashes).
    prefix_hashes: list[int] | None = None

    @property
    def estimated_tokens(self) -> int:
        """Tokens this request will occupy on a server: prompt plus requested output."""
        return self.prompt_tokens + self.max_tokens


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, request: SchedulingRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        """Return the candidates that remain eligible (a subset, order kept)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, request: SchedulingRequest, candidates: Sequence[Endpoint]) -> list[float]:
        """One score in [0, 1] per candidate, higher is better."""
        ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self, request: SchedulingRequest, candidates: Sequence[Endpoint], totals: Sequence[float], count: int
    ) -> list[Endpoint]:
        """Up to `count` distinct endpoints, the chosen one first, then fallbacks in order of preference."""
        ...


@runtime_checkable
class PickObserver(Protocol):
    """Optional hook for plugins that learn from decisions (the prefix index learns the served endpoint)."""

    def observe(self, request: SchedulingRequest, endpoint: Endpoint) -> None: ...
