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
* rag: retrieval-augmented generation: one short shared system prompt, then the top-k documents retrieved for
  the question, drawn from a corpus of D documents with Zipf popularity (a few are retrieved often, most
  rarely; the most relevant first), then the question. Little is shared beyond the system prompt.
* bursty: the shared-prefix shape with on/off arrivals: phases alternate between `on` × and `off` × the
  mean rate (default 1.8 and 0.2), each phase lasting `phase_requests` mean-rate arrivals.
* mixed-length: short chats and long documents together (a `long_share` of the requests), unrelated prompts.
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


def rag(
    *, qps: float, count: int, documents: int = 200, top_k: int = 4, doc_tokens: int = 400,
    system_tokens: int = 300, question_tokens: int = 60, output_tokens: int = 128, zipf: float = 1.1,
    model: str = DEFAULT_MODEL, seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    system = text(rng, system_tokens, "[rag assistant]")
    corpus = [text(random.Random(seed * 7919 + d), doc_tokens, f"[doc {d}]") for d in range(documents)]
    weights = [1.0 / (d + 1) ** zipf for d in range(documents)]
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        picked: list[int] = []
        while len(picked) < min(top_k, documents):
            d = rng.choices(range(documents), weights)[0]
            if d not in picked:
                picked.append(d)  # in retrieval order: the most relevant first
        context = "\n\n".join(corpus[d] for d in picked)
        question = text(rng, question_tokens, f"[question {i}]")
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
        ]
        out.append(
            Request(
                at, "/v1/chat/completions", _chat(model, messages, output_tokens), {"top": str(picked[0])}
            )
        )
    return out


def _on_off_arrivals(
    rng: random.Random, count: int, qps: float, on: float, off: float, phase_requests: int
) -> list[float]:
    """Poisson arrivals whose rate alternates between on × qps and off × qps; each phase lasts
    phase_requests / qps seconds (so the mean rate is (on + off) / 2 × qps)."""
    phase = phase_requests / qps
    index, now = 0, 0.0
    out: list[float] = []
    while len(out) < count:
        rate = (on if index % 2 == 0 else off) * qps
        step = rng.expovariate(rate)
        boundary = (index + 1) * phase
        if now + step > boundary:  # memoryless: restart the draw at the phase boundary with the new rate
            index += 1
            now = boundary
            continue
        now += step
        out.append(now)
    return out


def bursty(
    *, qps: float, count: int, groups: int = 16, users: int = 8, system_tokens: int = 3000,
    question_tokens: int = 150, output_tokens: int = 128, on: float = 1.8, off: float = 0.2,
    phase_requests: int = 40, model: str = DEFAULT_MODEL, seed: int = 0,
) -> list[Request]:  # fmt: skip
    shaped = shared_prefix(
        qps=qps, count=count, groups=groups, users=users, system_tokens=system_tokens,
        question_tokens=question_tokens, output_tokens=output_tokens, model=model, seed=seed,
    )  # fmt: skip
    times = _on_off_arrivals(random.Random(seed + 1), count, qps, on, off, phase_requests)
    return [Request(at, r.path, r.body, r.tags) for at, r in zip(times, shaped, strict=True)]


def mixed_length(
    *, qps: float, count: int, short_tokens: int = 200, long_tokens: int = 6000, long_share: float = 0.2,
    short_output: int = 64, long_output: int = 256, model: str = DEFAULT_MODEL, seed: int = 0,
) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    out = []
    for i, at in enumerate(_arrivals(rng, count, qps)):
        long = rng.random() < long_share
        tokens = rng.randint(long_tokens // 2, long_tokens * 3 // 2) if long else rng.randint(
            short_tokens // 2, short_tokens * 3 // 2)  # fmt: skip
        body = _chat(
            model,
            [{"role": "user", "content": text(rng, tokens, f"[r{i}]")}],
            long_output if long else short_output,
        )
        out.append(Request(at, "/v1/chat/completions", body, {"kind": "long" if long else "short"}))
    return out


WORKLOADS = {
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
    "multi-lora": multi_lora,
    "no-sharing": no_sharing,
    "rag": rag,
    "bursty": bursty,
    "mixed-length": mixed_length,
}
