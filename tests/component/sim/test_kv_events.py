"""The simulator's KV-cache events over real ZMQ sockets, read by the picker's precise scorer."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.precise_prefix.scorer import PrecisePrefixParams, PrecisePrefixScorer
from epp_lab.sim import FleetConfig, SimFleet

pytest.importorskip("zmq")

OFFSET = -1000
HANG_GUARD_S = 20.0


async def until(condition, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after a generous guard (never a timing assertion)."""
    async with asyncio.timeout(HANG_GUARD_S):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def request(prompt: str, path: str = "/v1/completions", model: str = "m") -> SchedulingRequest:
    return SchedulingRequest("r", model, model, prompt=prompt, prompt_tokens=-(-len(prompt) // 4),
                             headers={":path": path})  # fmt: skip


async def post(address: str, path: str, body: dict) -> dict:
    async with aiohttp.ClientSession() as s, s.post(f"http://{address}{path}", json=body) as r:
        assert r.status == 200, await r.text()
        return json.loads(await r.text())


async def test_precise_scorer_follows_the_simulator_blocks_and_evictions() -> None:
    config = FleetConfig(
        replicas=2, model="m", time_scale=0.01, kv_events_port_offset=OFFSET, num_gpu_blocks=40
    )
    async with SimFleet(config) as fleet:
        pool = EndpointPool([Endpoint(a) for a in fleet.addresses])
        scorer = PrecisePrefixScorer(
            PrecisePrefixParams(
                tokenizer="simulator", events_port_offset=OFFSET, replay_port_offset=1, fallback=False
            )
        )
        scorer.attach(pool)
        try:
            a, b = pool.all()
            # Connected and replayed (nothing yet): both views complete before the first request.
            views = scorer.index.views
            await until(lambda: all((v := views.get(e.address)) and v.synced for e in (a, b)), "views synced")
            prompt = "shared system prompt, long enough for several blocks. " * 30  # 1,620 chars: 25 blocks
            req = request(prompt)
            out = await post(a.address, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 2})
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            full = len(prompt) // 64
            await until(
                lambda: scorer.matched_blocks(req, CycleState(), [a, b]) == [full, 0], "blocks stored"
            )
            view = scorer.index.view(a.address)
            assert view is not None and view.synced and view.block_size == 16
            # The prediction is what the engine then reports.
            predicted = scorer.predicted_tokens(req, CycleState(), a)
            out = await post(a.address, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 2})
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted == full * 16

            # Chat: the simulator's template, rendered from the picker's serialized messages.
            messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]
            chat = request("<|system|>" + prompt + "<|user|>hi", "/v1/chat/completions")
            await post(
                b.address, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 2}
            )
            await until(
                lambda: scorer.matched_blocks(chat, CycleState(), [a, b])[1] > 0, "chat blocks stored"
            )
            predicted = scorer.predicted_tokens(chat, CycleState(), b)
            out = await post(
                b.address, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 2}
            )
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted > 0

            # 40 blocks per replica: two other long prompts evict the first one, and the index sees it.
            for i in range(2):
                other = f"unrelated prompt number {i} " * 60
                await post(a.address, "/v1/completions", {"model": "m", "prompt": other, "max_tokens": 2})
            await until(lambda: scorer.matched_blocks(req, CycleState(), [a, b])[0] < full, "evictions seen")
            assert view.removed_blocks > 0
        finally:
            await scorer.aclose()
