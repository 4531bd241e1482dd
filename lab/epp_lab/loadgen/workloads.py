"""Synthetic workloads, generated deterministically from a seed (~4 characters per token).

Each workload is a list of `Request(at, path, body)` with Poisson arrival offsets `at` (seconds) at `qps`.
All requests stream (SSE) with `stream_options.include_usage` so clients can read cached tokens.

* shared-prefix: G groups × U users; every group shares a long system prompt (S tokens); each request adds
  a question (Q tokens) and asks for O output tokens.
* multi-turn: C conversations; turn t resends the whole history (all earlier questions and answers) plus a
  new question. Turns of one conversation are spaced so they arrive in order.
* multi-lora: requests spread over `adapters` LoRA adapters with tiered popularity (60/30/10 % over the
  top 20 % / next 30 % / rest), short unshared prompts.
* no-sharing: unrelated prompts of varied length (uniform between Q/2 and 2Q tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from epp.config import CHARS_PER_TOKEN
from epp_lab.sim.config import DEFAULT_MODEL

_WORDS = [
    "gpu",
    "kernel",
    "tensor",
    "cache",
    "token",
    "model",
    "batch",
    "stream",
    "latency",
    "router",
    "envoy",
    "pool",
    "replica",
    "prefix",
    "decode",
    "prefill",
    "adapter",
    "queue",
    "shard",
    "weight",
    "layer",
    "vector",
    "matrix",
    "memory",
    "block",
    "index",
    "hash",
    "score",
    "picker",
    "scale",
    "cluster",
    "node",
    "pod",
    "service",
    "gateway",
    "request",
    "response",
    "budget",
    "policy",
    "metric",
    "signal",
    "window",
    "buffer",
]


@dataclass(slots=True)
class Request:
    at: float  # seconds after the start
    path: str
    body: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)


def text(rng: random.Random, tokens: int, tag: str = "") -> str:
    """About `tokens` tokens of filler words (deterministic given rng state); `tag` makes it unique."""
    target = tokens * CHARS_PER_TOKEN
    parts = [tag] if tag else []
    size = len(tag)
    while size < target:
        word = _WORDS[rng.randrange(len(_WORDS))]
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:target]


def _arrivals(rng: random.Random, count: int, qps: float) -> list[float]:
    now, out = 0.0, []
    for _ in range(count):
        now += rng.expovariate(qps)
        out.append(now)
    return out


def _chat(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def shared_prefix(
    *, qps: float, count: int, groups: int = 16, users: int = 8, system_tokens: int = 4000,
    question_tokens: int = 200, output_tokens: int = 100, model: str = DEFAULT_MODEL,
    seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    prefixes = [text(rng, system_tokens, f"[group {g}]") for g in range(groups)]
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        g, u = rng.randrange(groups), rng.randrange(users)
        question = text(rng, question_tokens, f"[user {u} q{i}]")
        messages = [{"role": "system", "content": prefixes[g]}, {"role": "user", "content": question}]
        body = _chat(model, messages, output_tokens)
        out.append(Request(at, "/v1/chat/completions", body, {"group": str(g)}))
    return out


def multi_turn(
    *, qps: float, count: int, conversations: int = 24, turn_tokens: int = 300, answer_tokens: int = 150,
    output_tokens: int = 100, system_tokens: int = 500, model: str = DEFAULT_MODEL,
    seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": text(rng, system_tokens, f"[conv {c}]")}] for c in range(conversations)
    ]
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        c = i % conversations  # round-robin: turns of one conversation are `conversations` arrivals apart
        history = histories[c]
        history.append({"role": "user", "content": text(rng, turn_tokens, f"[c{c} t{len(history)}]")})
        out.append(
            Request(at, "/v1/chat/completions", _chat(model, list(history), output_tokens), {"conv": str(c)})
        )
        history.append({"role": "assistant", "content": text(rng, answer_tokens)})
    return out


def lora_adapters(count: int) -> list[str]:
    return [f"adapter-{i:02d}" for i in range(count)]


def multi_lora(
    *, qps: float, count: int, adapters: int = 15, prompt_tokens: int = 300, output_tokens: int = 100,
    seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    names = lora_adapters(adapters)
    hot = max(1, round(adapters * 0.2))
    warm = max(1, round(adapters * 0.3))
    tiers = [names[:hot], names[hot : hot + warm], names[hot + warm :] or names[-1:]]
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        roll = rng.random()
        tier = tiers[0] if roll < 0.6 else (tiers[1] if roll < 0.9 else tiers[2])
        adapter = tier[rng.randrange(len(tier))]
        body = _chat(
            adapter, [{"role": "user", "content": text(rng, prompt_tokens, f"[r{i}]")}], output_tokens
        )
        out.append(Request(at, "/v1/chat/completions", body, {"adapter": adapter}))
    return out


def no_sharing(
    *, qps: float, count: int, prompt_tokens: int = 800, output_tokens: int = 100,
    model: str = DEFAULT_MODEL, seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        tokens = rng.randint(prompt_tokens // 2, prompt_tokens * 2)
        body = _chat(model, [{"role": "user", "content": text(rng, tokens, f"[r{i}]")}], output_tokens)
        out.append(Request(at, "/v1/chat/completions", body))
    return out


WORKLOADS = {
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
    "multi-lora": multi_lora,
    "no-sharing": no_sharing,
}
