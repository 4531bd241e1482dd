"""One request's journey through the picker, independent of the wire:

    parse body → resolve target model & priority → admission (shedding) → schedule → account & learn

`Pipeline.decide` returns a `Decision` (destination list, rewritten body if any) or raises `Rejection`;
`Pipeline.finish` runs once when the request's stream ends, whatever the outcome. The ext_proc servicer
owns the wire; this module owns the order of the steps, each of which lives in its own module.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from epp.admission.saturation import SaturationDetector
from epp.config import Config
from epp.datastore.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.observability.metrics import RequestMetrics
from epp.request import parse_request
from epp.routing import ModelRouter
from epp.scheduling.interfaces import SchedulingRequest
from epp.scheduling.scheduler import Scheduler, SchedulingResult

# Request headers the picker reads.
REQUEST_ID = "x-request-id"
OBJECTIVE = "x-gateway-inference-objective"
MODEL_REWRITE = "x-gateway-model-name-rewrite"


@dataclass(slots=True)
class Decision:
    request: SchedulingRequest
    endpoints: list[Endpoint]  # chosen first, then fallbacks
    destination: str  # header value: "ip:port" or "ip:port,ip:port,..."
    new_body: bytes | None  # re-encoded body when the model was rewritten
    request_id_generated: bool
    started: float
    served: Endpoint | None = None  # the endpoint holding our in-flight count (picked, or served if told)

    def response_headers(self) -> list[tuple[str, str]]:
        headers = [("x-gateway-destination-endpoint", self.destination)]
        if self.request_id_generated:
            headers.append((REQUEST_ID, self.request.request_id))
        if self.new_body is not None:
            headers.append(("content-length", str(len(self.new_body))))
        return headers


class Pipeline:
    def __init__(
        self,
        config: Config,
        pool: EndpointPool,
        scheduler: Scheduler,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.pool = pool
        self.router = ModelRouter(config)
        self.detector = SaturationDetector(config.scheduling.saturation, config.scheduling.scrape)
        self.metrics = metrics
        self.fallbacks = config.limits.fallback_endpoints

    def prepare(
        self, headers: Mapping[str, str], body: bytes | None, subset: frozenset[str] | None
    ) -> tuple[SchedulingRequest, dict | None, bool]:
        """Parse and resolve; returns (scheduling request, decoded body or None, request id generated)."""
        request_id = headers.get(REQUEST_ID, "")
        generated = not request_id
        if generated:
            request_id = uuid.uuid4().hex
        if body is None:  # bodyless request: route by load only
            model = headers.get(MODEL_REWRITE, "")
            return (
                SchedulingRequest(
                    request_id,
                    model,
                    model,
                    headers=headers,
                    subset=subset,
                    priority=self.router.priority(headers.get(OBJECTIVE)),
                ),
                None,
                generated,
            )
        parsed = parse_request(body, headers.get(":path", ""))
        target = self.router.resolve(parsed.model, headers.get(MODEL_REWRITE))
        request = SchedulingRequest(
            request_id=request_id,
            model=parsed.model,
            target_model=target.model,
            prompt=parsed.prompt,
            prompt_tokens=parsed.prompt_tokens,
            max_tokens=parsed.max_tokens,
            lora_adapter=target.model if target.lora else None,
            cache_salt=parsed.cache_salt,
            priority=self.router.priority(headers.get(OBJECTIVE)),
            headers=headers,
            subset=subset,
        )
        return request, parsed.body, generated

    def decide(
        self,
        headers: Mapping[str, str],
        body: bytes | None,
        subset: frozenset[str] | None = None,
        *,
        learn: bool = True,
    ) -> Decision:
        """Choose the endpoint(s). `learn=False` leaves teaching the learning plugins (prefix index) to a
        later `learn(decision)` call, so the ext_proc servicer can send its reply first."""
        started = time.perf_counter()
        model = target = ""
        try:
            request, decoded, generated = self.prepare(headers, body, subset)
            model, target = request.model, request.target_model
            endpoints = self.pool.all()
            self.admit(request, endpoints)
            result: SchedulingResult = self.scheduler.schedule(request, endpoints, count=1 + self.fallbacks)
        except Rejection as rejection:
            if self.metrics:
                self.metrics.rejected(model, target, rejection.code)
            raise
        if self.metrics:
            self.metrics.scheduled(time.perf_counter() - started, result.plugin_seconds)
            self.metrics.started(model, target)
        chosen = result.endpoints[0]
        chosen.acquire(request.estimated_tokens)
        if learn:
            self.scheduler.observe(request, chosen)
        new_body = None
        if decoded is not None and target != model:
            decoded["model"] = target
            new_body = orjson.dumps(decoded)
        return Decision(
            request=request,
            endpoints=result.endpoints,
            destination=",".join(e.address for e in result.endpoints),
            new_body=new_body,
            request_id_generated=generated,
            started=started,
            served=chosen,
        )

    def admit(self, request: SchedulingRequest, endpoints: list[Endpoint]) -> None:
        """Shed a sheddable request while the endpoints it may use (the gateway's subset, if any) are
        saturated. With none at all there is nothing to be saturated: scheduling answers 503 and says why."""
        subset = request.subset
        eligible = endpoints if subset is None else [e for e in endpoints if e.address in subset]
        if eligible:
            self.detector.admit(request.priority, eligible, self.config.pool.name)

    def learn(self, decision: Decision) -> None:
        """Teach the learning plugins the picked endpoint (see `decide(learn=False)`)."""
        self.scheduler.observe(decision.request, decision.endpoints[0])

    def served_by(self, decision: Decision, address: str) -> None:
        """The gateway reports which endpoint really served the request (a fallback, after a retry):
        move our in-flight count there and teach the index."""
        current = decision.served
        if current is not None and current.address == address:
            return
        endpoint = self.pool.get(address)
        if endpoint is None:
            return
        tokens = decision.request.estimated_tokens
        if current is not None:
            current.release(tokens)
        endpoint.acquire(tokens)
        decision.served = endpoint
        self.scheduler.observe(decision.request, endpoint)

    def finish(self, decision: Decision, status: int) -> None:
        """Exactly once per decided request, when its stream ends (success, error, or disconnect)."""
        if decision.served is not None:
            decision.served.release(decision.request.estimated_tokens)
            decision.served = None
        if self.metrics:
            error = None if 0 < status < 400 else ("client_disconnected" if status == 0 else f"http_{status}")
            self.metrics.finished(
                decision.request.model,
                decision.request.target_model,
                time.perf_counter() - decision.started,
                error,
            )
