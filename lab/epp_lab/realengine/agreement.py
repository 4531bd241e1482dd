"""How well do the prefix indexes predict a real vLLM's cache? Per request, the cached prompt tokens each
index predicts for the replica the request goes to, against `usage.prompt_tokens_details.cached_tokens`.

    precise      the `precise-prefix-cache` scorer's view (the replicas' KV events, the model's tokenizer):
                 matched blocks x 128, capped at (prompt tokens - 1) rounded down to whole blocks
    approximate  the `prefix-cache` scorer's index (64-character blocks of the text, taught by the routing):
                 matched blocks x 16 estimated tokens, capped and rounded down the same way

Both see the same requests, built as the picker builds them (`epp.requestcontrol.parsing`), and learn as in
the picker (the approximate index records each request on its replica; the precise one reads the events).
Requests are sequential; after each, the run waits (under a hang guard) until the replica's events for it
have arrived, so a prediction never races the previous request's events. Phases, on 2 replicas with
128-block caches:

    shared-prefix   5 groups x 4 users, ~600-token group prefixes, round-robin over the replicas
    multi-turn      3 chat conversations x 4 turns (greedy answers go back into the history), seeded replica
    lora            adapter `lora-1` (preloaded on every replica) and the same prompts on the base model
    evictions       one ~1,500-token prompt, then 14 unrelated ones on the same replica (enough to evict it
                    from the engine's 128 blocks, not from the approximate index's share of the text), then
                    the first one again

(Word salad tokenizes at ~1.5x the 4-characters-per-token estimate with this tokenizer, so a "600-token"
prefix is ~1,000 real tokens.)

Agreement = share of requests whose prediction equals the reported cached tokens exactly; also the mean
absolute error (tokens) and hit agreement (both zero or both non-zero).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from epp.config import CHARS_PER_TOKEN
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.requestcontrol.parsing import parse_request
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.precise_prefix.scorer import PrecisePrefixParams, PrecisePrefixScorer
from epp.scheduling.plugins.prefix_cache.index import PrefixIndex, block_hashes
from epp_lab.realengine.replicas import (
    BLOCK_SIZE,
    KV_PORT_OFFSET,
    REPLAY_PORT_OFFSET,
    SERVED_NAME,
    RealEngineEnv,
)

_WORDS = (
    "alpha beta gamma delta river mountain meadow silver vector weight window harbor lambda kernel cache "
    "router replica tensor golden quiet rapid ancient modern ocean island tower bridge forest valley client "
    "server packet stream buffer socket envoy picker adapter block prefix engine queue model layer matrix"
)
WORDS = _WORDS.split()
EVENTS_GUARD_S = 30.0


def text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of word salad (~4 characters per token)."""
    words: list[str] = []
    size = 0
    while size < tokens * CHARS_PER_TOKEN:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words) + "\n"


@dataclass(slots=True)
class Step:
    phase: str
    replica: int
    path: str
    body: dict[str, Any]
    conversation: int = -1  # multi-turn: the answer is appended to this conversation's history


@dataclass(slots=True)
class Outcome:
    phase: str
    replica: int
    prompt_tokens: int
    cached: int  # what vLLM reported
    precise: int
    approximate: int
    synced: bool  # the precise view of the replica was complete
    events_late: bool = False


@dataclass(slots=True)
class Summary:
    requests: int
    precise_agreement: float
    approximate_agreement: float
    precise_mae_tokens: float
    approximate_mae_tokens: float
    precise_hit_agreement: float
    approximate_hit_agreement: float
    cached_tokens_total: int
    requests_with_hits: int

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> Summary:
        n = len(outcomes) or 1

        def share(pred: str) -> float:
            return sum(getattr(o, pred) == o.cached for o in outcomes) / n

        def mae(pred: str) -> float:
            return sum(abs(getattr(o, pred) - o.cached) for o in outcomes) / n

        def hits(pred: str) -> float:
            return sum((getattr(o, pred) > 0) == (o.cached > 0) for o in outcomes) / n

        return cls(
            requests=len(outcomes),
            precise_agreement=share("precise"),
            approximate_agreement=share("approximate"),
            precise_mae_tokens=mae("precise"),
            approximate_mae_tokens=mae("approximate"),
            precise_hit_agreement=hits("precise"),
            approximate_hit_agreement=hits("approximate"),
            cached_tokens_total=sum(o.cached for o in outcomes),
            requests_with_hits=sum(o.cached > 0 for o in outcomes),
        )


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        phases = dict.fromkeys(o.phase for o in self.outcomes)
        return {
            "all": asdict(Summary.of(self.outcomes)),
            "phases": {p: asdict(Summary.of([o for o in self.outcomes if o.phase == p])) for p in phases},
            "events_late": sum(o.events_late for o in self.outcomes),
            "unsynced_predictions": sum(not o.synced for o in self.outcomes),
        }


def workload(seed: int = 7, replicas: int = 2, flood: int = 14) -> list[Step]:
    """The phases of the module docstring (chat histories grow as the run goes: see `run`)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    groups = [text(rng, 600) for _ in range(5)]
    for user in range(4):
        for prefix in groups:
            body = {
                "model": SERVED_NAME,
                "prompt": prefix + f"user {user}: " + text(rng, 100),
                "max_tokens": 2,
            }
            steps.append(Step("shared-prefix", len(steps) % replicas, "/v1/completions", body))
    systems = [text(rng, 300) for _ in range(3)]
    for turn in range(4):
        for c, system in enumerate(systems):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": text(rng, 150)}]
            body = {
                "model": SERVED_NAME,
                "messages": messages,
                "max_tokens": 16,
                "temperature": 0,
                "turn": turn,
            }
            steps.append(Step("multi-turn", rng.randrange(replicas), "/v1/chat/completions", body, c))
    lora_prompts = [text(rng, 500) for _ in range(2)]
    for user in range(3):
        for p, prefix in enumerate(lora_prompts):
            body = {"model": "lora-1", "prompt": prefix + text(rng, 60), "max_tokens": 2}
            steps.append(Step("lora", (user + p) % replicas, "/v1/completions", body))
    for prefix in lora_prompts:
        body = {"model": SERVED_NAME, "prompt": prefix + text(rng, 60), "max_tokens": 2}
        steps.append(Step("lora", 0, "/v1/completions", body))
    victim = {"model": SERVED_NAME, "prompt": text(rng, 1000), "max_tokens": 2}
    steps.append(Step("evictions", 0, "/v1/completions", victim))
    for _ in range(flood):
        body = {"model": SERVED_NAME, "prompt": text(rng, 1000), "max_tokens": 2}
        steps.append(Step("evictions", 0, "/v1/completions", body))
    steps.append(Step("evictions", 0, "/v1/completions", dict(victim)))
    return steps


def _request(step: Step, body: dict[str, Any]) -> SchedulingRequest:
    parsed = parse_request(json.dumps(body).encode(), step.path)
    return SchedulingRequest(
        request_id="agreement",
        model=parsed.model,
        target_model=parsed.model,
        prompt=parsed.prompt,
        prompt_tokens=parsed.prompt_tokens,
        max_tokens=parsed.max_tokens,
        cache_salt=parsed.cache_salt,
        headers={":path": step.path},
    )


def _cap(tokens: int, prompt_tokens: int) -> int:
    """What vLLM can report: whole blocks, never the prompt's last token."""
    return min(tokens, max(0, prompt_tokens - 1)) // BLOCK_SIZE * BLOCK_SIZE


class AgreementRun:
    """Both indexes over the replicas at `urls` (addresses `127.0.0.1:P`, events on P + 1)."""

    def __init__(self, env: RealEngineEnv, addresses: Sequence[str], kv_cache_blocks: int = 128) -> None:
        self.pool = EndpointPool([Endpoint(a) for a in addresses])
        for e in self.pool:
            e.metrics.block_size = BLOCK_SIZE
        self.precise = PrecisePrefixScorer(
            PrecisePrefixParams(
                tokenizer=str(env.model_dir),
                events_port_offset=KV_PORT_OFFSET,
                replay_port_offset=REPLAY_PORT_OFFSET,  # joining late, it replays the stream from seq 0
                fallback=False,
                speculative=False,
                base_model=SERVED_NAME,
            )
        )
        self.approx = PrefixIndex(kv_cache_blocks * BLOCK_SIZE * CHARS_PER_TOKEN // 64)

    async def __aenter__(self) -> AgreementRun:
        """Subscribe, and await the replicas' complete views (replayed from their publishers' start)."""
        self.precise.attach(self.pool)
        views = self.precise.index.views
        deadline = time.monotonic() + EVENTS_GUARD_S
        while time.monotonic() < deadline and not all(
            (v := views.get(e.address)) is not None and v.synced for e in self.pool
        ):
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.precise.aclose()

    async def run(self, steps: Sequence[Step]) -> Report:
        report = Report()
        histories: dict[int, list[dict[str, str]]] = {}
        endpoints = self.pool.all()
        async with aiohttp.ClientSession() as session:
            for step in steps:
                body = dict(step.body)
                turn = body.pop("turn", None)
                if step.conversation >= 0:
                    history = histories.setdefault(step.conversation, [body["messages"][0]])
                    if turn:
                        history.append(body["messages"][1])
                    else:
                        history[1:] = [body["messages"][1]]
                    body["messages"] = list(history)
                endpoint = endpoints[step.replica]
                request = _request(step, body)
                state = CycleState()
                precise = self.precise.predicted_tokens(request, state, endpoint)
                view = self.precise.index.view(endpoint.address)
                hashes = block_hashes(request.prompt, seed_model=request.target_model)
                matched = self.approx.match(hashes, [endpoint.address])[0] if hashes else 0
                approximate = _cap(matched * 16, request.prompt_tokens)
                self.approx.record(endpoint.address, hashes)
                url = f"http://{endpoint.address}{step.path}"
                async with session.post(url, json=body) as response:
                    answer = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}: {answer}")
                usage = answer["usage"]
                if step.conversation >= 0:
                    reply = answer["choices"][0]["message"]["content"] or ""
                    histories[step.conversation].append({"role": "assistant", "content": reply})
                late = not await self._events_for(request, endpoint, usage["prompt_tokens"])
                report.outcomes.append(
                    Outcome(
                        phase=step.phase,
                        replica=step.replica,
                        prompt_tokens=usage["prompt_tokens"],
                        cached=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                        precise=precise,
                        approximate=approximate,
                        synced=bool(view is not None and view.synced),
                        events_late=late,
                    )
                )
        return report

    async def _events_for(self, request: SchedulingRequest, endpoint: Endpoint, prompt_tokens: int) -> bool:
        """Await the replica's events for the request just served: its prompt's full blocks are stored
        (False if they did not arrive within the guard; the run goes on)."""
        want = min(prompt_tokens // BLOCK_SIZE, self.precise.max_blocks)
        deadline = time.monotonic() + EVENTS_GUARD_S
        while time.monotonic() < deadline:
            state = CycleState()
            if self.precise.matched_blocks(request, state, [endpoint])[0] >= want:
                return True
            await asyncio.sleep(0.01)
        return False
