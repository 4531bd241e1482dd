"""Scorer `precise-prefix-cache`: prefix-cache affinity from what the engines report they cache.

    blocks(r, e)  = full blocks of the request's prompt, tokenized as the engine does, in e's block size
    match(e)      = leading prompt blocks endpoint e holds (`index.PreciseIndex`): stored (its KV events) or
                    pending (requests we sent there that are still running: it is computing their blocks)
    precise(e)    = match(e) / blocks(r, e)                          (0 when the prompt has no full block)
    approx(e)     = the approximate index's ratio (`prefix_cache.index`, taught by our own routing)
    ratio(e)      = precise(e)                       while e's event stream is complete since its start
                  = max(precise(e), approx(e))       otherwise (events lost, joined late): fallback
    score(e)      = ratio(e) x min(1, load_gap / gap(e))      (the load guard of `prefix-cache`)

Why the fallback is a max: after a loss the stored blocks we know are still right (the engine told us, and
removals we missed can only make a few of them stale) but blocks we never heard of are unknown, so the
approximate guess fills in what the events cannot say. The view becomes complete again when the engine's
publisher restarts (sequence back to 0) or it clears its cache (AllBlocksCleared), or at once when the
publisher's replay socket (`replay_port_offset`) returns the missed messages.

Events come from each endpoint's ZMQ publisher at `tcp://<endpoint host>:<events_port>` or, with
`events_port_offset`, at the endpoint's port + offset (several engines per host); the subscription follows
the pool (`epp.datalayer.kvevents.subscriber`), in asyncio tasks that never block the request path. The
prompt is tokenized locally (`tokenizer`: the model's folder, or "simulator" for `epp sim`) once per
request. vLLM never reuses a prompt's last token, so `predicted_tokens` caps the match at
(prompt tokens - 1) rounded down to whole blocks, as the engine's `cached_tokens` are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from epp.config import CHARS_PER_TOKEN, ConfigError
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.kvevents.events import EventBatch
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.precise_prefix.index import (
    DEFAULT_MAX_BLOCKS_PER_ENDPOINT,
    PreciseIndex,
    chain_keys,
    root_key,
)
from epp.scheduling.plugins.precise_prefix.tokenize import (
    Tokenizer,
    load_tokenizer,
    split_messages,
    token_id_prompt,
)
from epp.scheduling.plugins.prefix_cache.index import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_CAPACITY_BLOCKS,
    PrefixIndex,
    block_hashes,
)
from epp.scheduling.plugins.prefix_cache.scorer import load_guard
from epp.scheduling.registry import PluginContext, register

log = logging.getLogger(__name__)

VLLM_EVENTS_PORT = 5557  # vLLM's default ZMQ publisher port
DEFAULT_BLOCK_SIZE = 16  # tokens per block until an endpoint's events or metrics say otherwise (vLLM GPU)


@dataclass(frozen=True, slots=True)
class PrecisePrefixParams:
    tokenizer: str = ""  # local folder with tokenizer.json (+ chat template), or "simulator" (required)
    events_port: int = VLLM_EVENTS_PORT  # the engines' KV-event publisher port, on each endpoint's host
    events_port_offset: int = (
        0  # non-zero: publisher at the endpoint's port + offset (engines sharing a host)
    )
    replay_port_offset: int = 0  # non-zero: the engine's replay socket at publisher port + offset
    topic: str = ""  # subscription prefix ("" = every topic)
    max_blocks: int = 256  # prompt blocks tokenized into keys and matched per request
    max_blocks_per_endpoint: int = DEFAULT_MAX_BLOCKS_PER_ENDPOINT  # stored blocks kept per endpoint
    load_gap: float = 4.0  # as prefix-cache: requests the warm endpoint may run ahead (0: no guard)
    speculative: bool = True  # count running requests' prompt blocks on their endpoint (pending)
    fallback: bool = True  # approximate index for endpoints whose event stream is incomplete
    base_model: str = ""  # served name of the base model: any other target is an adapter ("": guess)

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ConfigError(
                "plugin 'precise-prefix-cache': parameter 'tokenizer' is required (a local folder with "
                'tokenizer.json, or "simulator")'
            )
        if self.load_gap < 0:
            raise ConfigError("plugin 'precise-prefix-cache': load_gap must be >= 0")
        for name, low in (("max_blocks", 1), ("max_blocks_per_endpoint", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"plugin 'precise-prefix-cache': {name} must be >= {low}")
        if not 0 < self.events_port < 65536:
            raise ConfigError("plugin 'precise-prefix-cache': events_port must be within 1..65535")


class _RequestState:
    """This scorer's part of a request's CycleState."""

    __slots__ = ("approx", "keys", "matches", "pending", "root", "tokens")

    def __init__(self, tokens: list[int] | None, root: int, approx: list[int]) -> None:
        self.tokens = tokens  # None: the prompt could not be tokenized (no match possible)
        self.root = root
        self.keys: dict[int, list[int]] = {}  # block size -> keys
        self.approx = approx  # the approximate index's block hashes
        self.matches: list[int] | None = None  # matched blocks of the last score, per candidate
        self.pending: tuple[str, list[int]] | None = None  # (address, keys) added as pending


class PrecisePrefixScorer:
    """Prefix-cache affinity from the engines' KV events: the share of the prompt's leading blocks (in the
    engine's tokens and block size) an endpoint reports holding, with the approximate index as fallback
    while an endpoint's event stream is incomplete, and the load guard of `prefix-cache`. Parameters:
    tokenizer (required), events_port (5557), events_port_offset (0), replay_port_offset (0), max_blocks
    (256), load_gap (4), speculative (true), fallback (true)."""

    name = "precise-prefix-cache"

    def __init__(self, params: PrecisePrefixParams, tokenizer: Tokenizer | None = None) -> None:
        self.params = params
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(params.tokenizer)
        self.index = PreciseIndex(params.max_blocks_per_endpoint)
        self.approx = PrefixIndex(DEFAULT_CAPACITY_BLOCKS)
        self.max_blocks = params.max_blocks
        self.load_gap = params.load_gap
        self.subscriber: object | None = None
        self._capacity_seen: dict[str, int] = {}
        self.tokenize_errors = 0

    # -- wiring -----------------------------------------------------------------------------------------

    def attach(self, pool: EndpointPool) -> None:
        """Forget endpoints when they leave `pool`; subscribe to the events of its endpoints (now if an
        event loop runs, else when `start` is called on one)."""
        from epp.datalayer.kvevents.subscriber import KVEventSubscriber

        pool.on_removed(self._forget)
        self.subscriber = KVEventSubscriber(
            pool,
            self,
            self.events_address,
            replay_of=self.replay_address if self.params.replay_port_offset else None,
            topic=self.params.topic,
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # validating a config, or a dry run: no subscription
        self.start()

    def start(self) -> None:
        try:
            self.subscriber.start()  # type: ignore[union-attr]
        except ImportError:
            raise ConfigError(
                "plugin 'precise-prefix-cache': install the 'precise' extra (pip install 'epp[precise]')"
            ) from None

    async def aclose(self) -> None:
        """Stop the subscription (tests, shutdown)."""
        if self.subscriber is not None:
            await self.subscriber.aclose()  # type: ignore[attr-defined]

    def events_address(self, endpoint: Endpoint) -> str:
        p = self.params
        port = endpoint.port + p.events_port_offset if p.events_port_offset else p.events_port
        return f"tcp://{endpoint.host}:{port}"

    def replay_address(self, endpoint: Endpoint) -> str:
        p = self.params
        port = endpoint.port + p.events_port_offset if p.events_port_offset else p.events_port
        return f"tcp://{endpoint.host}:{port + p.replay_port_offset}"

    def _forget(self, endpoint: Endpoint) -> None:
        self.index.remove_endpoint(endpoint.address)
        self.approx.remove_endpoint(endpoint.address)
        self._capacity_seen.pop(endpoint.address, None)

    # -- the event sink (called by the subscriber on the event loop) ------------------------------------

    def apply(self, address: str, batch: EventBatch) -> None:
        self.index.apply(address, batch)

    def restarted(self, address: str) -> None:
        self.index.restarted(address)

    def desynced(self, address: str, reason: str) -> None:
        self.index.desynced(address, reason)

    # -- per request ------------------------------------------------------------------------------------

    def _adapter(self, request: SchedulingRequest) -> str | None:
        if request.lora_adapter is not None:
            return request.lora_adapter
        target = request.target_model
        base = self.params.base_model
        if base:
            return None if target == base else target
        # Without a configured base model: an adapter once an engine has stored blocks under that name.
        for view in self.index.views.values():
            if target in view.lora_names:
                return target
        return None

    def _state(self, request: SchedulingRequest, state: CycleState) -> _RequestState:
        mine = state.get(self.name)
        if mine is None:
            mine = state[self.name] = _RequestState(
                self._tokenize(request),
                root_key(self._adapter(request), request.cache_salt),
                block_hashes(
                    request.prompt,
                    seed_model=request.target_model,
                    cache_salt=request.cache_salt,
                    max_blocks=self.max_blocks * 8,
                )
                if self.params.fallback
                else [],
            )
        return mine  # type: ignore[no-any-return]

    def _tokenize(self, request: SchedulingRequest) -> list[int] | None:
        prompt = request.prompt
        if not prompt:
            return None
        path = request.headers.get(":path", "")
        # Tokens that can matter: max_blocks of the largest block size seen (+1: vLLM's last-token rule).
        sizes = [v.block_size for v in self.index.views.values() if v.block_size]
        limit = self.max_blocks * max(sizes, default=DEFAULT_BLOCK_SIZE) + 1
        try:
            if "/chat/completions" in path:
                messages = split_messages(prompt)
                return self.tokenizer.encode_chat(messages, limit) if messages else None
            ids = token_id_prompt(prompt, request.prompt_tokens)
            return ids if ids is not None else self.tokenizer.encode_text(prompt, limit)
        except Exception as err:  # a template that raises, odd content: no precise match for this one
            self.tokenize_errors += 1
            if self.tokenize_errors == 1:
                log.warning("precise-prefix-cache: cannot tokenize a prompt (%s); scoring it 0", err)
            return None

    def _keys(self, mine: _RequestState, block_size: int) -> list[int]:
        keys = mine.keys.get(block_size)
        if keys is None:
            tokens = mine.tokens or []
            keys = mine.keys[block_size] = chain_keys(tokens, block_size, mine.root, self.max_blocks)
        return keys

    def block_size(self, endpoint: Endpoint) -> int:
        view = self.index.views.get(endpoint.address)
        if view is not None and view.block_size:
            return view.block_size
        return endpoint.metrics.block_size or DEFAULT_BLOCK_SIZE

    def matched_blocks(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[int]:
        """Leading prompt blocks each candidate holds (stored or pending), in its own block size."""
        mine = self._state(request, state)
        if not mine.tokens:
            mine.matches = [0] * len(candidates)
            return mine.matches
        sizes = [self.block_size(e) for e in candidates]
        out = [0] * len(candidates)
        for size in set(sizes):
            group = [i for i, s in enumerate(sizes) if s == size]
            found = self.index.match(self._keys(mine, size), [candidates[i].address for i in group])
            for i, m in zip(group, found, strict=True):
                out[i] = m
        mine.matches = out
        return out

    def predicted_tokens(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> int:
        """Prompt tokens `endpoint` would find cached (precise view only): matched blocks x block size,
        at most (prompt tokens - 1) rounded down to whole blocks (the engine recomputes the last token)."""
        mine = self._state(request, state)
        if not mine.tokens:
            return 0
        size = self.block_size(endpoint)
        matched = self.index.match(self._keys(mine, size), [endpoint.address])[0]
        return min(matched * size, (len(mine.tokens) - 1) // size * size)

    def score(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> list[float]:
        mine = self._state(request, state)
        matches = self.matched_blocks(request, state, candidates)
        scores = [0.0] * len(candidates)
        if mine.tokens:
            for i, e in enumerate(candidates):
                total = len(self._keys(mine, self.block_size(e)))
                if total:
                    scores[i] = matches[i] / total
        if self.params.fallback and mine.approx:
            views = self.index.views
            stale = [i for i, e in enumerate(candidates) if not ((v := views.get(e.address)) and v.synced)]
            if stale:
                guess = self.approx.match(mine.approx, [candidates[i].address for i in stale])
                total = len(mine.approx)
                for i, g in zip(stale, guess, strict=True):
                    scores[i] = max(scores[i], g / total)
        return load_guard(scores, candidates, self.load_gap)

    # -- lifecycle --------------------------------------------------------------------------------------

    def pre_request(self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint) -> None:
        """The request went to `endpoint`: its prompt's blocks are pending there until it completes, and
        the approximate index learns it."""
        mine = self._state(request, state)
        if self.params.speculative and mine.tokens:
            if mine.pending is not None:
                self.index.drop_pending(*mine.pending)
            keys = self._keys(mine, self.block_size(endpoint))
            if keys:
                mine.pending = (endpoint.address, keys)
                self.index.add_pending(endpoint.address, keys)
        if mine.approx:
            self._maybe_resize(endpoint)
            self.approx.record(endpoint.address, mine.approx)

    def response_complete(
        self, request: SchedulingRequest, state: CycleState, endpoint: Endpoint, status: int
    ) -> None:
        mine = state.get(self.name)
        if mine is not None and mine.pending is not None:
            self.index.drop_pending(*mine.pending)
            mine.pending = None

    def _maybe_resize(self, endpoint: Endpoint) -> None:
        m = endpoint.metrics
        if not (m.num_blocks and m.block_size):
            return
        tokens = m.num_blocks * m.block_size
        if self._capacity_seen.get(endpoint.address) != tokens:
            self._capacity_seen[endpoint.address] = tokens
            self.approx.set_capacity(
                endpoint.address, max(1, tokens * CHARS_PER_TOKEN // DEFAULT_BLOCK_CHARS)
            )

    # -- what operators see -----------------------------------------------------------------------------

    def explain(
        self, request: SchedulingRequest, state: CycleState, candidates: Sequence[Endpoint]
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        mine = self._state(request, state)
        matches = mine.matches or [0] * len(candidates)
        views = self.index.views
        return {"prompt_tokens": float(len(mine.tokens or ()))}, [
            {
                "matched_blocks": float(m),
                "block_size": float(self.block_size(e)),
                "events_synced": float(bool((v := views.get(e.address)) and v.synced)),
            }
            for m, e in zip(matches, candidates, strict=True)
        ]

    def endpoint_details(self, endpoint: Endpoint) -> dict[str, float]:
        view = self.index.views.get(endpoint.address)
        stats = getattr(self.subscriber, "stats", {}).get(endpoint.address)
        out = {
            "kv_blocks": float(len(view.blocks)) if view else 0.0,
            "kv_pending_blocks": float(view.pending) if view else 0.0,
            "kv_events_synced": float(bool(view and view.synced)),
        }
        if stats is not None:
            out["kv_event_messages"] = float(stats.messages)
            out["kv_event_gaps"] = float(stats.gaps)
        return out

    def gauges(self) -> dict[str, float]:
        return {"epp_precise_prefix_blocks": float(self.index.total_blocks())}


@register("precise-prefix-cache", "scorer", PrecisePrefixParams)
def _precise(params: PrecisePrefixParams, ctx: PluginContext) -> PrecisePrefixScorer:
    scorer = PrecisePrefixScorer(params)
    scorer.attach(ctx.pool)
    return scorer
