"""Open-loop streaming client: sends each request at its arrival offset and measures, per request,
TTFT (time to the first SSE event carrying a token), end-to-end latency, output tokens and cached tokens
(from the final usage chunk). Used by the demo and to cross-check k6's TTFT in the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from epp_lab.loadgen.workloads import Request


@dataclass(slots=True)
class Result:
    status: int
    ttft_s: float  # -1 when no token arrived
    e2e_s: float
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    error: str = ""


async def _one(session: aiohttp.ClientSession, url: str, request: Request) -> Result:
    start = time.perf_counter()
    ttft = -1.0
    out_tokens = prompt = cached = 0
    try:
        async with session.post(url + request.path, json=request.body) as response:
            if response.status != 200:
                body = await response.text()
                return Result(response.status, -1, time.perf_counter() - start, 0, 0, 0, body[:200])
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    data = orjson.loads(event[6:])
                    choices = data.get("choices") or []
                    if choices:
                        if ttft < 0:
                            ttft = time.perf_counter() - start
                        out_tokens += 1
                    usage = data.get("usage")
                    if usage:
                        out_tokens = usage.get("completion_tokens", out_tokens)
                        prompt = usage.get("prompt_tokens", 0)
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
            return Result(200, ttft, time.perf_counter() - start, out_tokens, prompt, cached)
    except (TimeoutError, aiohttp.ClientError, ValueError) as err:
        return Result(0, -1, time.perf_counter() - start, 0, 0, 0, f"{type(err).__name__}: {err}")


async def run(
    url: str,
    requests: list[Request],
    progress: Callable[[int, int, int], None] | None = None,
    timeout_s: float = 300.0,
) -> tuple[list[Result], float]:
    """Send every request at its offset (open loop); returns results in request order and wall seconds."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    results: list[Result | None] = [None] * len(requests)
    done = errors = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def fire(i: int, request: Request) -> None:
            nonlocal done, errors
            delay = request.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule itself, not synchronisation
            result = await _one(session, url, request)
            results[i] = result
            done += 1
            errors += result.status != 200
            if progress:
                progress(done, len(requests), errors)

        await asyncio.gather(*(fire(i, r) for i, r in enumerate(requests)))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[Result], wall_s: float) -> dict[str, float]:
    ok = [r for r in results if r.status == 200 and r.ttft_s >= 0]
    ttft = [r.ttft_s for r in ok]
    e2e = [r.e2e_s for r in ok]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9),
        "ttft_p99_s": percentile(ttft, 0.99),
        "e2e_p50_s": percentile(e2e, 0.5),
        "e2e_p99_s": percentile(e2e, 0.99),
        "tpot_p50_s": percentile(tpot, 0.5),
        "output_tok_s": out_tokens / wall_s if wall_s else 0.0,
        "req_s": len(ok) / wall_s if wall_s else 0.0,
        "client_hit_rate": cached / prompt if prompt else 0.0,
        "wall_s": wall_s,
    }
