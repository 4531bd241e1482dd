"""HTTP face of the simulated fleet: an OpenAI/vLLM-compatible aiohttp app per replica, and `SimFleet`.

Per replica: `POST /v1/completions`, `POST /v1/chat/completions` (streaming SSE or not), `GET /v1/models`,
`GET /health`, `GET /metrics` (vLLM metric names, hand-written Prometheus text) and `GET /sim/stats` (JSON
counters for benchmarks). Every response carries `x-sim-replica: <port>`.

Streaming responses send their headers together with the first token, so a client's time to first byte is
the simulated TTFT.

    async with SimFleet(FleetConfig(replicas=4, time_scale=0.1)) as fleet:
        fleet.addresses   # ["127.0.0.1:41234", ...]
        fleet.stats()     # the /sim/stats document of every replica, plus totals
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from epp.sim.engine import FINISHED, RUNNING, TTFT_BUCKETS, WAITING, SimRequest
from epp.sim.profiles import BLOCK_SIZE, DEFAULT_PROFILE, PROFILES, get_profile
from epp.sim.replica import Replica

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
DEFAULT_MAX_TOKENS = 16
SHUTDOWN_GRACE_S = 0.5
"""On stop, in-flight requests get this long (real seconds) to finish before they are cancelled."""


@dataclass(slots=True)
class FleetConfig:
    """Everything that shapes a simulated fleet. `None` sizes come from the latency profile.

    `base_port` 0 gives every replica its own ephemeral port; otherwise replicas use consecutive ports.
    `time_scale` multiplies every simulated duration (0.1 = ten times faster than real time).
    """

    replicas: int = 1
    host: str = "127.0.0.1"
    base_port: int = 0
    model: str = DEFAULT_MODEL
    lora_adapters: tuple[str, ...] = ()
    max_lora: int = 4
    profile: str = DEFAULT_PROFILE
    num_gpu_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    time_scale: float = 1.0
    seed: int = 0
    stream_interval: int = 1

    def __post_init__(self) -> None:
        self.lora_adapters = tuple(self.lora_adapters)
        problems = []
        if self.replicas < 1:
            problems.append(f"replicas must be >= 1 (got {self.replicas})")
        if not 0 <= self.base_port <= 65535 or (
            self.base_port and self.base_port + self.replicas - 1 > 65535
        ):
            problems.append(f"base_port {self.base_port} + {self.replicas} replicas is outside 0..65535")
        if self.profile not in PROFILES:
            problems.append(f"unknown profile {self.profile!r}; known: {', '.join(sorted(PROFILES))}")
        if self.max_lora < 1:
            problems.append(f"max_lora must be >= 1 (got {self.max_lora})")
        if self.model in self.lora_adapters:
            problems.append(f"LoRA adapter {self.model!r} has the base model's name")
        for name, value in (
            ("num_gpu_blocks", self.num_gpu_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (got {value})")
        if not self.time_scale > 0:
            problems.append(f"time_scale must be > 0 (got {self.time_scale})")
        if self.stream_interval < 1:
            problems.append(f"stream_interval must be >= 1 (got {self.stream_interval})")
        if problems:
            raise ValueError("invalid simulator config: " + "; ".join(problems))


class BadRequest(Exception):
    """A client error answered vLLM-style: `{"object": "error", "message", "type", "code"}`."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _error(status: int, kind: str, message: str, port: int) -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"x-sim-replica": str(port)},
    )


def _max_tokens(body: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise BadRequest(f"{key} must be a positive integer (got {value!r})")
        return value
    return DEFAULT_MAX_TOKENS


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest("each content part must be an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest("a text content part needs a string 'text'")
                parts.append(text)
            else:
                parts.append(f"<{part['type']}>")  # images etc.: a placeholder keeps the prefix stable
        return "\n".join(parts)
    raise BadRequest("message content must be a string or a list of content parts")


def chat_prompt(messages: Any) -> str:
    """Serialize chat messages to the prompt text, Llama-3-template style.

    Each message is a self-delimited segment, so the text of a conversation is a prefix of the text of its
    continuation (multi-turn requests hit the prefix cache), as with real chat templates.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = ["<|begin_of_text|>"]
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a string 'role'")
        out.append(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_content_text(m.get('content'))}<|eot_id|>"
        )
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


class ReplicaServer:
    """The HTTP app of one replica."""

    def __init__(self, replica: Replica, port: int, fleet: SimFleet) -> None:
        self.replica = replica
        self.port = port
        self.fleet = fleet
        self.headers = {"x-sim-replica": str(port)}
        self.created = int(time.time())
        self._id_prefix = f"{port}-"
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sim/stats", self.sim_stats)
        self.app = app

    # ---- OpenAI endpoints ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json(request)
            model = self._model(body)
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                texts = [prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                texts = prompt
            else:
                raise BadRequest("'prompt' must be a string or a non-empty list of strings")
            max_tokens = _max_tokens(body, "max_tokens")
            stream, include_usage = self._stream_flags(body)
        except BadRequest as e:
            return _error(e.status, e.kind, str(e), self.port)
        return await self._generate(request, False, model, texts, max_tokens, stream, include_usage)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._json(request)
            model = self._model(body)
            text = chat_prompt(body.get("messages"))
            max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
            stream, include_usage = self._stream_flags(body)
        except BadRequest as e:
            return _error(e.status, e.kind, str(e), self.port)
        return await self._generate(request, True, model, [text], max_tokens, stream, include_usage)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest(f"the simulator supports n=1 only (got n={n!r})")
        return body

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model", self.replica.model)
        if not isinstance(model, str):
            raise BadRequest("'model' must be a string")
        if model not in self.replica.served:
            raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
        return model

    @staticmethod
    def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object")
        return stream, bool(options.get("include_usage", False))

    async def _generate(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        texts: list[str],
        max_tokens: int,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        replica = self.replica
        limit = replica.engine.max_model_len
        woke = asyncio.Event()
        reqs: list[SimRequest] = []
        for text in texts:
            req = replica.make_request(text, model, max_tokens)
            if req.prompt_tokens + max_tokens > limit:
                return _error(
                    400,
                    "BadRequestError",
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{req.prompt_tokens + max_tokens} tokens ({req.prompt_tokens} in the prompt, "
                    f"{max_tokens} in the completion).",
                    self.port,
                )
            req.listener = woke.set
            reqs.append(req)
        offsets = [replica.output_offset(t) for t in texts]
        rid = ("chatcmpl-" if chat else "cmpl-") + self._id_prefix + reqs[0].request_id
        created = int(time.time())
        for req in reqs:
            replica.submit(req)
        try:
            if stream:
                return await self._stream(
                    request, woke, chat, model, reqs, offsets, rid, created, include_usage
                )
            while any(r.state != FINISHED for r in reqs):
                await woke.wait()
                woke.clear()
            choices: list[dict[str, Any]] = []
            for i, (r, off) in enumerate(zip(reqs, offsets, strict=True)):
                text = replica.output_text(off, 0, r.generated)
                if chat:
                    choices.append(
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None,
                            "finish_reason": "length",
                        }
                    )
                else:
                    choices.append(
                        {
                            "index": i,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": "length",
                            "stop_reason": None,
                        }
                    )
            doc = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _usage(reqs),
            }
            return web.Response(body=orjson.dumps(doc), content_type="application/json", headers=self.headers)
        finally:
            for r in reqs:
                if r.state in (WAITING, RUNNING):
                    replica.engine.abort(r)

    async def _stream(
        self,
        request: web.Request,
        woke: asyncio.Event,
        chat: bool,
        model: str,
        reqs: list[SimRequest],
        offsets: list[int],
        rid: str,
        created: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        replica = self.replica
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(reqs)
        resp: web.StreamResponse | None = None
        while True:
            await woke.wait()
            woke.clear()
            parts: list[bytes] = []
            for i, r in enumerate(reqs):
                upto = r.notified
                if upto <= sent[i]:
                    continue
                if sent[i] == 0:
                    # The first event carries exactly the first token, however late this writer runs, so
                    # the first byte a client sees is the first token (TTFT), never a batch of them.
                    upto = 1
                text = replica.output_text(offsets[i], sent[i], upto)
                finish = "length" if r.state == FINISHED and upto >= r.generated else None
                if chat:
                    delta = {"role": "assistant", "content": text} if sent[i] == 0 else {"content": text}
                    choice: dict[str, Any] = {
                        "index": i,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                else:
                    choice = {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                sent[i] = upto
                doc = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
                parts.append(b"data: " + orjson.dumps(doc) + b"\n\n")
            done = all(r.state == FINISHED and sent[i] >= r.generated for i, r in enumerate(reqs))
            if done:
                if include_usage:
                    doc = {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(reqs),
                    }
                    parts.append(b"data: " + orjson.dumps(doc) + b"\n\n")
                parts.append(b"data: [DONE]\n\n")
            if resp is None:
                # Headers leave with the first token: time to first byte = TTFT.
                resp = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "x-sim-replica": str(self.port),
                    }
                )
                await resp.prepare(request)
            if parts:
                await resp.write(b"".join(parts))
            if any(r.notified > sent[i] for i, r in enumerate(reqs)):
                woke.set()  # tokens held back behind a first event go out in the next one
            if done:
                await resp.write_eof()
                return resp

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
        doc = self.fleet.stats()
        doc["replica"] = next(r for r in doc["replicas"] if r["port"] == self.port)
        return web.Response(
            body=orjson.dumps(doc),
            content_type="application/json",
            headers=self.headers,
        )


def _text_choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}


def _usage(reqs: list[SimRequest]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in reqs)
    completion = sum(r.generated for r in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)},
    }


def replica_stats(replica: Replica, address: str) -> dict[str, Any]:
    """Counters of one replica since start, plus its current queue state."""
    e = replica.engine
    st = e.stats
    return {
        "address": address,
        "port": int(address.rsplit(":", 1)[1]),
        "prompt_tokens": st.prompt_tokens,
        "cached_tokens": st.cached_tokens,
        "prefix_hit_rate": st.cached_tokens / st.prompt_tokens if st.prompt_tokens else 0.0,
        "prefix_queries": st.prefix_queries,
        "generated_tokens": st.generated_tokens,
        "requests_received": st.requests_received,
        "completed": st.completed,
        "aborted": st.aborted,
        "lora_loads": st.lora_loads,
        "preemptions": st.preemptions,
        "evicted_blocks": st.evicted_blocks,
        "steps": st.steps,
        "running": len(e.running),
        "waiting": len(e.waiting),
        "kv_usage": e.kv_usage(),
        "ttft_mean_s": st.ttft_sum / st.ttft_count if st.ttft_count else 0.0,
    }


_SUMMED = (
    "prompt_tokens",
    "cached_tokens",
    "prefix_queries",
    "generated_tokens",
    "requests_received",
    "completed",
    "aborted",
    "lora_loads",
    "preemptions",
    "evicted_blocks",
    "running",
    "waiting",
)


def fleet_stats(per_replica: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"replicas": [...], "total": {...}}` with the counters summed and the fleet's prefix hit rate."""
    total: dict[str, Any] = {k: sum(r[k] for r in per_replica) for k in _SUMMED}
    prompt = total["prompt_tokens"]
    total["prefix_hit_rate"] = total["cached_tokens"] / prompt if prompt else 0.0
    # CPU seconds of the whole simulator process: lets a benchmark check the simulator is not its bottleneck.
    total["process_cpu_s"] = time.process_time()
    return {"replicas": per_replica, "total": total}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(replica: Replica) -> str:
    """Prometheus text exposition with vLLM's metric names, labelled `model_name` like vLLM."""
    e = replica.engine
    st = e.stats
    m = f'model_name="{_label(replica.model)}"'
    running_loras = _label(",".join(e.running_loras()))
    waiting_loras = _label(",".join(e.waiting_loras()))
    kv = e.kv_usage()
    out = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{m}}} {len(e.running)}.0",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{m}}} {len(e.waiting)}.0",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{m}}} {kv!r}",
        "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage (older name). 1 means 100 percent usage.",
        "# TYPE vllm:gpu_cache_usage_perc gauge",
        f"vllm:gpu_cache_usage_perc{{{m}}} {kv!r}",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",num_gpu_blocks="{e.num_gpu_blocks}"}} 1.0',
        "# HELP vllm:lora_requests_info Running stats on lora requests.",
        "# TYPE vllm:lora_requests_info gauge",
        f'vllm:lora_requests_info{{max_lora="{e.max_lora}",running_lora_adapters="{running_loras}",'
        f'waiting_lora_adapters="{waiting_loras}"}} {time.time()!r}',
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{m}}} {st.prefix_queries}.0",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{m}}} {st.cached_tokens}.0",
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{m}}} {st.prompt_tokens}.0",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{m}}} {st.generated_tokens}.0",
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{m}}} {st.preemptions}.0",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{finished_reason="length",{m}}} {st.completed}.0',
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    cumulative = 0
    for le, n in zip(TTFT_BUCKETS, st.ttft_buckets, strict=True):
        cumulative += n
        out.append(f'vllm:time_to_first_token_seconds_bucket{{le="{le!r}",{m}}} {cumulative}.0')
    out.append(f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",{m}}} {st.ttft_count}.0')
    out.append(f"vllm:time_to_first_token_seconds_count{{{m}}} {st.ttft_count}.0")
    out.append(f"vllm:time_to_first_token_seconds_sum{{{m}}} {st.ttft_sum!r}")
    out.append("")
    return "\n".join(out)


def bind_sockets(host: str, base_port: int, count: int) -> list[socket.socket]:
    """Bind `count` listening sockets: consecutive ports from `base_port`, or ephemeral ones when it is 0.

    Raises `OSError` naming the address that failed; sockets bound so far are closed.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            port = base_port + i if base_port else 0
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
            s.listen(1024)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@dataclass(slots=True)
class SimFleet:
    """N replicas in this process and event loop. Use `async with`, or `start()` / `stop()`."""

    config: FleetConfig = field(default_factory=FleetConfig)
    replicas: list[Replica] = field(default_factory=list)
    servers: list[ReplicaServer] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> None:
        c = self.config
        profile = get_profile(c.profile)
        socks = bind_sockets(c.host, c.base_port, c.replicas)
        try:
            for sock in socks:
                port = sock.getsockname()[1]
                replica = Replica(
                    model=c.model,
                    adapters=c.lora_adapters,
                    profile=profile,
                    num_gpu_blocks=c.num_gpu_blocks,
                    max_num_seqs=c.max_num_seqs,
                    max_num_batched_tokens=c.max_num_batched_tokens,
                    max_lora=c.max_lora,
                    time_scale=c.time_scale,
                    seed=c.seed,
                    stream_interval=c.stream_interval,
                )
                server = ReplicaServer(replica, port, self)
                # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
                runner = web.AppRunner(
                    server.app,
                    handle_signals=False,
                    access_log=None,
                    handler_cancellation=True,
                    shutdown_timeout=SHUTDOWN_GRACE_S,
                )
                await runner.setup()
                self._runners.append(runner)
                await web.SockSite(runner, sock).start()
                replica.start()
                self.replicas.append(replica)
                self.servers.append(server)
                host = f"[{c.host}]" if ":" in c.host else c.host
                self.addresses.append(f"{host}:{port}")
        except BaseException:
            await self.stop()
            for s in socks:
                s.close()
            raise

    async def stop(self) -> None:
        """Close the listeners, let in-flight requests finish for `SHUTDOWN_GRACE_S`, stop the engines."""
        await asyncio.gather(*(r.cleanup() for r in self._runners), return_exceptions=True)
        self._runners.clear()
        for replica in self.replicas:
            await replica.stop()

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """`{"replicas": [per-replica /sim/stats], "total": {summed counters, prefix_hit_rate}}`."""
        return fleet_stats([replica_stats(r, a) for r, a in zip(self.replicas, self.addresses, strict=True)])
