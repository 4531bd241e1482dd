"""The request director: the one place that orders the steps of a request, independent of the wire.

    decide:   parse body → resolve target model & priority → candidates (the gateway's subset, applied
              once) → admission (shedding) → schedule (filters → scorers → picker) → in-flight count
    then, as the wire reports them, the request's lifecycle:
    dispatched        the decision reply left: plugins' `pre_request` hooks (e.g. the prefix index learns)
    served_by         the gateway says another endpoint served it: the in-flight count moves there and the
                      `pre_request` hooks hear of the new endpoint
    response_started  the first response body chunk arrived (time to first token): `response_started` hooks
    finished          the picker stopped following the request: its stream ended, whatever the outcome, or
                      (`followed_to_end` False) the picker let the rest of the response pass without it
                      after the first chunk (`response.follow: first-byte`): in-flight released,
                      `response_complete` hooks, request metrics

`explain` runs the same `decide` steps as a dry run: nothing is counted, learned or dispatched.
The ext_proc servicer owns the wire; this module owns the order; each step lives in its own module.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from epp.config import Config
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.observability.metrics import RequestMetrics
from epp.requestcontrol.admission import SaturationDetector
from epp.requestcontrol.headers import (
    DEFAULT_FAIRNESS_ID,
    DESTINATION,
    FAIRNESS_ID,
    MODEL_REWRITE,
    OBJECTIVE,
    REQUEST_ID,
    SLO_TPOT_MS,
    SLO_TTFT_MS,
    first,
)
from epp.requestcontrol.parsing import parse_request
from epp.requestcontrol.routing import ModelRouter
from epp.scheduling.interfaces import (
    CycleState,
    PreRequest,
    ResponseComplete,
    ResponseStarted,
    SchedulingRequest,
)
from epp.scheduling.scheduler import CandidateExplanation, Scheduler, SchedulingResult

SUBSET_FILTER_NAME = "subset-hint"  # how explanations name the gateway's subset


@dataclass(slots=True)
class Decision:
    request: SchedulingRequest
    state: CycleState  # the plugins' per-request state, alive until the request ends
    endpoints: list[Endpoint]  # chosen first, then fallbacks
    destination: str  # header value: "ip:port" or "ip:port,ip:port,..."
    new_body: bytes | None  # re-encoded body when the model was rewritten
    request_id_generated: bool
    started: float  # perf_counter at the decision
    served: Endpoint | None = None  # the endpoint holding our in-flight count (picked, or served if told)
    dispatched_at: float = 0.0  # perf_counter when the decision reply left (0: not yet)
    first_byte: bool = False  # response_started already reported
    follow_to_end: bool = True  # follow the response to its end even where the picker could stop early

    def response_headers(self) -> list[tuple[str, str]]:
        headers = [(DESTINATION, self.destination)]
        if self.request_id_generated:
            headers.append((REQUEST_ID, self.request.request_id))
        if self.new_body is not None:
            headers.append(("content-length", str(len(self.new_body))))
        return headers


@dataclass(slots=True)
class Explanation:
    """What `decide` would do, step by step (`epp explain`)."""

    request: SchedulingRequest | None = None
    rejection: Rejection | None = None
    pool_saturation: float = 0.0
    destination: str = ""
    endpoints: list[Endpoint] = field(default_factory=list)
    candidates: list[CandidateExplanation] = field(default_factory=list)
    details: dict[str, float] = field(default_factory=dict)


class Director:
    def __init__(
        self,
        config: Config,
        pool: EndpointPool,
        scheduler: Scheduler,
        metrics: RequestMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` is the one metrics are stamped with (staleness); tests pass a fixed one."""
        self.config = config
        self.pool = pool
        self.scheduler = scheduler
        self.router = ModelRouter(config)
        self.detector = SaturationDetector(config.scheduling.saturation, config.scheduling.scrape, clock)
        self.metrics = metrics
        self.fallbacks = config.limits.fallback_endpoints
        response = config.response
        self._follow_all = response.follow == "full"
        self._sample_every = response.full_sample_every
        self._decisions = 0
        self._pre_request: list[PreRequest] = scheduler.hooks(PreRequest)
        self._response_started: list[ResponseStarted] = scheduler.hooks(ResponseStarted)
        self._response_complete: list[ResponseComplete] = scheduler.hooks(ResponseComplete)

    # -- the decision -----------------------------------------------------------------------------------

    def prepare(
        self, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[SchedulingRequest, dict | None, bool]:
        """Parse and resolve; returns (scheduling request, decoded body or None, request id generated)."""
        request_id = headers.get(REQUEST_ID, "")
        generated = not request_id
        if generated:
            request_id = uuid.uuid4().hex
        priority = self.router.priority(first(headers, OBJECTIVE))
        fairness_id = first(headers, FAIRNESS_ID) or DEFAULT_FAIRNESS_ID
        slo_ttft, slo_tpot = _objective_s(headers, SLO_TTFT_MS), _objective_s(headers, SLO_TPOT_MS)
        rewrite = first(headers, MODEL_REWRITE)
        if body is None:  # bodyless request: route by load only
            model = rewrite or ""
            request = SchedulingRequest(
                request_id, model, model, headers=headers, priority=priority, fairness_id=fairness_id,
                slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot,
            )  # fmt: skip
            return request, None, generated
        parsed = parse_request(body, headers.get(":path", ""))
        target = self.router.resolve(parsed.model, rewrite)
        request = SchedulingRequest(
            request_id=request_id,
            model=parsed.model,
            target_model=target.model,
            prompt=parsed.prompt,
            prompt_tokens=parsed.prompt_tokens,
            max_tokens=parsed.max_tokens,
            lora_adapter=target.model if target.lora else None,
            cache_salt=parsed.cache_salt,
            priority=priority,
            headers=headers,
            stream=parsed.stream,
            fairness_id=fairness_id,
            slo_ttft_s=slo_ttft,
            slo_tpot_s=slo_tpot,
        )
        return request, parsed.body, generated

    def candidates(self, subset: frozenset[str] | None) -> list[Endpoint]:
        """The endpoints this request may use: the pool, narrowed to the gateway's subset hint if any.
        An empty pool is left to the scheduler (503 no_endpoints); a subset naming none of a non-empty pool
        is 503 subset_empty."""
        endpoints = self.pool.all()
        if subset is None or not endpoints:
            return endpoints
        eligible = [e for e in endpoints if e.address in subset]
        if not eligible:
            raise Rejection(
                503,
                "subset_empty",
                f"no candidate endpoint: the gateway's subset hint ({SUBSET_FILTER_NAME}, {len(subset)} "
                f"addresses) lists none of the {len(endpoints)} endpoints of the pool",
            )
        return eligible

    def admit(self, request: SchedulingRequest, candidates: list[Endpoint]) -> None:
        """Shed a sheddable request while the endpoints it may use are saturated. With none at all there is
        nothing to be saturated: scheduling answers 503 and says why."""
        if candidates:
            self.detector.admit(request.priority, candidates, self.config.pool.name)

    def decide(
        self, headers: Mapping[str, str], body: bytes | None, subset: frozenset[str] | None = None
    ) -> Decision:
        """Choose the endpoint(s) and count the request in flight there. Raises `Rejection`. The caller
        reports the lifecycle: `dispatched` once the reply left, then `finished` exactly once."""
        started = time.perf_counter()
        model = target = ""
        state = CycleState()
        try:
            request, decoded, generated = self.prepare(headers, body)
            model, target = request.model, request.target_model
            candidates = self.candidates(subset)
            self.admit(request, candidates)
            result: SchedulingResult = self.scheduler.schedule(
                request, state, candidates, count=1 + self.fallbacks
            )
        except Rejection as rejection:
            if self.metrics:
                self.metrics.rejected(model, target, rejection.code)
            raise
        if self.metrics:
            self.metrics.scheduled(time.perf_counter() - started, result.plugin_seconds)
            self.metrics.started(model, target)
        chosen = result.endpoints[0]
        chosen.acquire(request.estimated_tokens)
        new_body = None
        if decoded is not None and target != model:
            decoded["model"] = target
            new_body = orjson.dumps(decoded)
        self._decisions += 1
        every = self._sample_every
        return Decision(
            request=request,
            state=state,
            endpoints=result.endpoints,
            destination=",".join(e.address for e in result.endpoints),
            new_body=new_body,
            request_id_generated=generated,
            started=started,
            served=chosen,
            follow_to_end=self._follow_all or (every > 0 and self._decisions % every == 0),
        )

    # -- the request's lifecycle ------------------------------------------------------------------------

    def dispatched(self, decision: Decision) -> None:
        """The decision reply left: the request is on its way to the chosen endpoint."""
        decision.dispatched_at = time.perf_counter()
        endpoint = decision.served
        if endpoint is not None:
            for hook in self._pre_request:
                hook.pre_request(decision.request, decision.state, endpoint)

    def served_by(self, decision: Decision, address: str) -> None:
        """The gateway reports which endpoint really served the request (a fallback, after a retry):
        move our in-flight count there and tell the plugins."""
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
        for hook in self._pre_request:
            hook.pre_request(decision.request, decision.state, endpoint)

    def response_started(self, decision: Decision) -> None:
        """The first byte of the response arrived (reported once)."""
        if decision.first_byte:
            return
        decision.first_byte = True
        endpoint = decision.served
        if endpoint is None or not self._response_started:
            return
        seconds = time.perf_counter() - (decision.dispatched_at or decision.started)
        for hook in self._response_started:
            hook.response_started(decision.request, decision.state, endpoint, seconds)

    def finished(self, decision: Decision, status: int, followed_to_end: bool = True) -> None:
        """Exactly once per decided request, when the picker stops following it: its stream ended (success,
        error, or disconnect), or, `followed_to_end` False, the rest of the response passes without it."""
        endpoint = decision.served
        if endpoint is not None:
            endpoint.release(decision.request.estimated_tokens)
            decision.served = None
            for hook in self._response_complete:
                hook.response_complete(decision.request, decision.state, endpoint, status)
        if self.metrics:
            error = None if 0 < status < 400 else ("client_disconnected" if status == 0 else f"http_{status}")
            duration = time.perf_counter() - decision.started if followed_to_end else None
            self.metrics.finished(decision.request.model, decision.request.target_model, duration, error)

    async def close(self) -> None:
        """On shutdown, after the ext_proc server stopped taking streams (requests still waiting for a
        decision get a clear error here once flow control holds any)."""

    # -- dry run ----------------------------------------------------------------------------------------

    def explain(
        self, headers: Mapping[str, str], body: bytes | None, subset: frozenset[str] | None = None
    ) -> Explanation:
        """The steps of `decide` with every candidate's scores; learns nothing, counts nothing."""
        pool = self.pool.all()
        out = Explanation(pool_saturation=self.detector.saturation(pool))
        try:
            request, _, _ = self.prepare(headers, body)
            out.request = request
            candidates = self.candidates(subset)
            self.admit(request, candidates)
            result = self.scheduler.schedule(
                request, CycleState(), candidates, count=1 + self.fallbacks, explain=True
            )
        except Rejection as rejection:
            out.rejection = rejection
            return out
        out.endpoints = result.endpoints
        out.destination = ",".join(e.address for e in result.endpoints)
        out.details = result.details or {}
        kept = {id(e) for e in candidates}
        out.candidates = [
            CandidateExplanation(e.address, dropped_by=SUBSET_FILTER_NAME) for e in pool if id(e) not in kept
        ]
        out.candidates += result.explanation or []
        return out


def _objective_s(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    """A latency objective header in milliseconds, as seconds; a bad value is a 400 naming the header."""
    raw = first(headers, names)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        name = next(n for n in names if n in headers)
        raise Rejection(
            400, "bad_request", f"header {name}: must be a positive number of milliseconds, got {raw!r}"
        )
    return value / 1000.0
