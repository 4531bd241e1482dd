"""A small real HTTP model-server stand-in for tests: OpenAI-ish responses that say who served them, SSE
streaming, and a vLLM-format /metrics page whose values the test sets."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Metrics:
    waiting: float = 0
    running: float = 0
    kv_usage: float = 0.0
    running_loras: list[str] = field(default_factory=list)
    waiting_loras: list[str] = field(default_factory=list)
    max_lora: int = 0
    model: str = "base-model"  # the base model served: vLLM labels every series with it (`model_name`)

    def render(self) -> str:
        m = f'model_name="{self.model}"'
        lines = [
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{m}}} {self.waiting}",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{m}}} {self.running}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{m}}} {self.kv_usage}",
        ]
        if self.max_lora:
            lines += [
                "# TYPE vllm:lora_requests_info gauge",
                f'vllm:lora_requests_info{{max_lora="{self.max_lora}",running_lora_adapters="'
                f'{",".join(self.running_loras)}",waiting_lora_adapters="{",".join(self.waiting_loras)}"}} '
                "1.7e9",
            ]
        return "\n".join(lines) + "\n"


class Upstream:
    """Serves POST anything: JSON `{"upstream": "ip:port", "model", "body_bytes", "headers"}` or, with
    `"stream": true`, `sse_events` SSE events numbered 0.. then `[DONE]`. Records every request."""

    def __init__(self, sse_events: int = 5, status: int = 200, hold_after_first: bool = False) -> None:
        self.metrics = Metrics()
        self.sse_events = sse_events
        # Streams send their first event, then wait for `release` (so the rest cannot arrive with it).
        self.hold_after_first = hold_after_first
        self.release = asyncio.Event()
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.hits = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set by a test, responses wait for it to be set
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/{tail:.*}", self._inference)
        app.router.add_get("/{tail:.*}", self._inference)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render())

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        record = {
            "path": request.path,
            "model": body.get("model") if isinstance(body, dict) else None,
            "body_bytes": len(raw),
            "body": raw,
            "headers": dict(request.headers),
        }
        self.requests.append(record)
        self.hits.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.status != 200:
            return web.json_response({"error": "injected failure"}, status=self.status)
        info = {"upstream": self.address, "model": record["model"], "body_bytes": len(raw),
                "destination": request.headers.get("x-gateway-destination-endpoint")}  # fmt: skip
        if isinstance(body, dict) and body.get("stream"):
            response = web.StreamResponse(
                headers={"content-type": "text/event-stream", "x-upstream": self.address}
            )
            await response.prepare(request)
            for i in range(self.sse_events):
                await response.write(f"data: {json.dumps({'index': i, **info})}\n\n".encode())
                if i == 0 and self.hold_after_first:
                    await self.release.wait()
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response(info, headers={"x-upstream": self.address})
