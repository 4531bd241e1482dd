"""Endpoints of the pool, their latest scraped metrics and the picker's own in-flight counts.

The data layer is the single place the scheduler reads from. Scrapers write `Endpoint.metrics`; the request
path writes the in-flight counters (`acquire` at pick time, `release` when the request's stream ends).
Everything here is plain, synchronous and single-threaded: it lives on the server's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True)
class MetricsSnapshot:
    """What the model server last reported. `updated_at` is `time.monotonic()` of the scrape (0 = never).

    `kv_usage` is the KV-cache fraction in use, 0..1. LoRA fields come from `vllm:lora_requests_info`
    (`max_lora` = 0 when the engine does not report LoRA). Cache shape (`block_size` tokens per block and
    `num_blocks`) is 0 when the server does not export it. `served_models`: the `model_name` labels of its
    running-requests series, i.e. the base model names it serves (empty when it does not label them).
    """

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_lora: int = 0
    served_models: frozenset[str] = frozenset()
    block_size: int = 0
    num_blocks: int = 0
    updated_at: float = 0.0

    def age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (infinity if never scraped)."""
        if self.updated_at == 0.0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(slots=True, eq=False)
class Endpoint:
    """One model-server replica: `address` is `ip:port` (the value we put in the destination header)."""

    address: str
    engine: str = "vllm"
    metrics: MetricsSnapshot = field(default_factory=MetricsSnapshot)
    # Set by the scraper: False after repeated failures (unreachable) until a scrape succeeds again.
    reachable: bool = True
    # Picker-side load, counted from the pick until the request's stream ends.
    inflight_requests: int = 0
    inflight_tokens: int = 0

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def load(self) -> float:
        """Requests on the server as best we know: max(in-flight requests we sent it, scraped running +
        waiting). Our own count covers the bursts between scrapes; the scrape covers other senders."""
        m = self.metrics
        scraped = m.running + m.waiting
        return self.inflight_requests if self.inflight_requests > scraped else scraped

    def acquire(self, tokens: int) -> None:
        self.inflight_requests += 1
        self.inflight_tokens += tokens

    def release(self, tokens: int) -> None:
        self.inflight_requests = max(0, self.inflight_requests - 1)
        self.inflight_tokens = max(0, self.inflight_tokens - tokens)


class EndpointPool:
    """The endpoints, keyed by address. Listeners hear about removals (the prefix index forgets them)."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._by_address: dict[str, Endpoint] = {}
        self._list: list[Endpoint] = []
        self._removal_listeners: list[Callable[[Endpoint], None]] = []
        self._change_listeners: list[Callable[[], None]] = []
        for endpoint in endpoints:
            self._by_address[endpoint.address] = endpoint
        self._list = list(self._by_address.values())
        self.synced = bool(self._list)

    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._list)

    def get(self, address: str) -> Endpoint | None:
        return self._by_address.get(address)

    def all(self) -> list[Endpoint]:
        """The endpoints as a list. Do not mutate it; it is shared until the next change."""
        return self._list

    def on_removed(self, listener: Callable[[Endpoint], None]) -> None:
        self._removal_listeners.append(listener)

    def on_changed(self, listener: Callable[[], None]) -> None:
        self._change_listeners.append(listener)

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the pool exactly `endpoints`, keeping the state (metrics, in-flight) of ones already known."""
        fresh: dict[str, Endpoint] = {}
        for endpoint in endpoints:
            fresh[endpoint.address] = self._by_address.get(endpoint.address, endpoint)
            fresh[endpoint.address].engine = endpoint.engine
        removed = [e for address, e in self._by_address.items() if address not in fresh]
        self._by_address = fresh
        self._list = list(fresh.values())
        self.synced = True
        for endpoint in removed:
            for listener in self._removal_listeners:
                listener(endpoint)
        for change_listener in self._change_listeners:
            change_listener()
