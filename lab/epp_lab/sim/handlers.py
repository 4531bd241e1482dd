"""The HTTP app of one simulated replica (aiohttp): OpenAI/vLLM endpoints over its `Replica`.

    POST /v1/completions, POST /v1/chat/completions   streaming (SSE, `sse.py`) or whole responses
    GET  /v1/models, /health
    GET  /metrics      vLLM metric names (`metrics_text.py`)
    GET  /sim/stats    JSON counters of this replica and the whole fleet (`stats.py`)

Every response carries `x-sim-replica: <port>`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from epp_lab.sim import openai, sse
from epp_lab.sim.engine import FINISHED, RUNNING, WAITING, SimRequest
from epp_lab.sim.metrics_text import render_metrics
from epp_lab.sim.openai import BadRequest, Generation
from epp_lab.sim.replica import Replica

MAX_BODY_BYTES = 64 * 1024 * 1024


def _error(status: int, kind: str, message: str, port: int) -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"x-sim-replica": str(port)},
    )


class ReplicaServer:
    """The HTTP app of one replica. `fleet_stats` returns the /sim/stats document of the whole fleet."""

    def __init__(self, replica: Replica, port: int, fleet_stats: Callable[[], dict[str, Any]]) -> None:
        self.replica = replica
        self.port = port
        self.fleet_stats = fleet_stats
        self.headers = {"x-sim-replica": str(port)}
        self.created = int(time.time())
        self._id_prefix = f"{port}-"
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/stats", self.sim_stats)
        self.app = app

    # ---- OpenAI endpoints ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai.parse_completions)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai.parse_chat)

    async def _serve(
        self, request: web.Request, parse: Callable[[bytes, str, frozenset[str]], Generation]
    ) -> web.StreamResponse:
        try:
            gen = parse(await request.read(), self.replica.model, self.replica.served)
            return await self._generate(request, gen)
        except BadRequest as e:
            return _error(e.status, e.kind, str(e), self.port)

    async def _generate(self, request: web.Request, gen: Generation) -> web.StreamResponse:
        replica = self.replica
        limit = replica.engine.max_model_len
        woke = asyncio.Event()
        reqs: list[SimRequest] = []
        for text in gen.texts:
            req = replica.make_request(text, gen.model, gen.max_tokens)
            if req.prompt_tokens + gen.max_tokens > limit:
                raise openai.context_length_error(limit, req.prompt_tokens, gen.max_tokens)
            req.listener = woke.set
            reqs.append(req)
        offsets = [replica.output_offset(t) for t in gen.texts]
        rid = ("chatcmpl-" if gen.chat else "cmpl-") + self._id_prefix + reqs[0].request_id
        created = int(time.time())
        for req in reqs:
            replica.submit(req)
        try:
            if gen.stream:
                return await sse.stream(request, replica, self.port, woke, gen, reqs, offsets, rid, created)
            while any(r.state != FINISHED for r in reqs):
                await woke.wait()
                woke.clear()
            texts = [replica.output_text(off, 0, r.generated) for r, off in zip(reqs, offsets, strict=True)]
            doc = openai.response(rid, gen.chat, created, gen.model, reqs, texts)
            return web.Response(body=orjson.dumps(doc), content_type="application/json", headers=self.headers)
        finally:
            for r in reqs:
                if r.state in (WAITING, RUNNING):
                    replica.engine.abort(r)

    # ---- other endpoints -----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        r = self.replica
        data = [
            {
                "id": r.model,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": r.model,
                "parent": None,
                "max_model_len": r.engine.max_model_len,
            }
        ]
        for a in r.adapters:
            data.append(
                {
                    "id": a,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": a,
                    "parent": r.model,
                }
            )
        return web.Response(
            body=orjson.dumps({"object": "list", "data": data}),
            content_type="application/json",
            headers=self.headers,
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(headers=self.headers)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=render_metrics(self.replica).encode(),
            headers={**self.headers, "Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def sim_stats(self, request: web.Request) -> web.Response:
        """This replica's counters under "replica", and every replica of this process (`SimFleet.stats`)."""
        doc = self.fleet_stats()
        doc["replica"] = next(r for r in doc["replicas"] if r["port"] == self.port)
        return web.Response(
            body=orjson.dumps(doc),
            content_type="application/json",
            headers=self.headers,
        )
