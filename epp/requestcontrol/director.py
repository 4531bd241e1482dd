"""The request director: the one place that orders the steps of a request, independent of the wire.

    decide:   parse body → resolve target model & priority → candidates (the gateway's subset, applied
              once) → admission (shedding; with flow control: dispatch now, hold, or reject) → schedule
              (filters → scorers → picker) → in-flight count
    held:     with flow control, a request the admission holds waits in the flow controller's queue; when
              capacity frees, the controller dispatches it: candidates (afresh) → schedule → in-flight
              count, with the state of that moment (late binding); the wire awaits it and asks `resume`
              for the decision (or the rejection: 429 / 503); a client gone while waiting is `abandon`ed
    then, as the wire reports them, the request's lifecycle:
    dispatched        the decision reply left: plugins' `pre_request` hooks (e.g. the prefix index learns)
    served_by         the gateway says another endpoint served it: the in-flight count moves there and the
                      `pre_request` hooks hear of the new endpoint
    response_started  the first response body chunk arrived (time to first token): `response_started` hooks
    finished          the picker stopped following the request: its stream ended, whatever the outcome, or
                      (`followed_to_end` False) the picker let the rest of the response pass without it
                      after the first chunk (`response.follow: first-byte`): in-flight released,
                      `response_complete` hooks, request metrics

The lifecycle also tells flow control when capacity may have freed (first byte, finished).
`explain` runs the same `decide` steps as a dry run: nothing is counted, learned, queued or dispatched.
The ext_proc servicer owns the wire; this module owns the order; each step lives in its own module.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from epp.config import Config, SaturationConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.errors import Rejection
from epp.flowcontrol import controller as fc
from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.gate import CapacityGate, SaturationGate
from epp.flowcontrol.queues import QueuedRequest
from epp.observability.metrics import FlowControlMetrics, RequestMetrics
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
    untrusted_headers,
)
from epp.requestcontrol.parsing import check_bodyless, parse_request
from epp.requestcontrol.routing import ModelRouter
from epp.scheduling.interfaces import (
    Closes,
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
    # Flow control's verdict: "off", "dispatch" (now), "queue" (held until capacity frees), "reject".
    flow_control: str = "off"
    flow_reason: str = ""
    gate_saturation: float = 0.0  # the gate's level for this request's candidates
    queued_ahead: int = 0  # queued requests that would go before it


class Director:
    def __init__(
        self,
        config: Config,
        pool: EndpointPool,
        scheduler: Scheduler,
        metrics: RequestMetrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        gate: CapacityGate | None = None,
    ) -> None:
        """`clock` is the one metrics are stamped with (staleness); tests pass a fixed one. `gate` replaces
        flow control's default capacity gate (`SaturationGate`)."""
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
        self.flow: FlowController | None = None
        self.gate: CapacityGate | None = None
        self._flow_metrics: FlowControlMetrics | None = None
        flow = config.flow_control
        if flow.enabled:
            saturation = config.scheduling.saturation
            thresholds = SaturationConfig(
                queue_threshold=flow.queue_threshold or saturation.queue_threshold,
                kv_threshold=flow.kv_threshold or saturation.kv_threshold,
                metrics_staleness_s=saturation.metrics_staleness_s,
            )
            gate_detector = SaturationDetector(thresholds, config.scheduling.scrape, clock)
            self.gate = gate or SaturationGate(gate_detector, pool)
            if metrics is not None:
                self._flow_metrics = FlowControlMetrics(
                    metrics.registry, config.pool.name, self._queue_snapshot, self._pool_level
                )
            scrape = config.scheduling.scrape
            self.flow = FlowController(
                flow, pool, self.gate, self.candidates, self._dispatch_held,
                shedding=self.detector.saturation, poll_s=lambda: scrape.period(len(pool)),
                record=self._flow_metrics.record if self._flow_metrics else None,
                pool_name=config.pool.name,
            )  # fmt: skip
        self.buffered_wait_s = flow.buffered_wait_s
        self.extend_message_timeout = flow.extend_message_timeout
        # Request headers the wire ignores and removes (security.trusted_control_headers).
        self.untrusted_headers = untrusted_headers(config.security.trusted_control_headers)

    # -- the decision -----------------------------------------------------------------------------------

    def prepare(
        self, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[SchedulingRequest, dict | None, bool]:
        """Parse and resolve; returns (scheduling request, decoded body or None, request id generated).
        A zero-length body is no body: routed on load alone, except a POST to an inference path (400)."""
        request_id = headers.get(REQUEST_ID, "")
        generated = not request_id
        if generated:
            request_id = uuid.uuid4().hex
        priority = self.router.priority(first(headers, OBJECTIVE))
        fairness_id = first(headers, FAIRNESS_ID) or DEFAULT_FAIRNESS_ID
        slo_ttft, slo_tpot = _objective_s(headers, SLO_TTFT_MS), _objective_s(headers, SLO_TPOT_MS)
        rewrite = first(headers, MODEL_REWRITE)
        if not body:  # bodyless request: route by load only
            check_bodyless(headers.get(":method", ""), headers.get(":path", ""))
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

    def admit(self, request: SchedulingRequest, candidates: list[Endpoint]) -> bool:
        """Admission. Without flow control: shed a sheddable request while the endpoints it may use are
        saturated (with none at all there is nothing to be saturated: scheduling answers 503 and says why);
        always False. With flow control: True when the request must wait in the queue (`FlowController.hold`:
        saturated, queued requests ahead, or no endpoint at all). Raises Rejection (429) to shed."""
        if self.flow is None:
            if candidates:
                self.detector.admit(request.priority, candidates, self.config.pool.name)
            return False
        return self.flow.hold(request, candidates)

    def decide(
        self,
        headers: Mapping[str, str],
        body: bytes | None,
        subset: frozenset[str] | None = None,
        *,
        timed: bool = False,
    ) -> Decision | QueuedRequest:
        """Choose the endpoint(s) and count the request in flight there. Raises `Rejection`. The caller
        reports the lifecycle: `dispatched` once the reply left, then `finished` exactly once.

        With flow control the request may be held instead: the result is then its `QueuedRequest`; the caller
        awaits its `ready` future, then calls `resume` (or `abandon`, if the client went away). `timed`: Envoy
        bounds the wait for this reply (`message_timeout`, BUFFERED bodies): hold at most
        `flow_control.buffered_wait_s`."""
        started = time.perf_counter()
        model = target = ""
        try:
            request, decoded, generated = self.prepare(headers, body)
            model, target = request.model, request.target_model
            candidates = self.candidates(subset)
            if self.admit(request, candidates):
                assert self.flow is not None
                if target == model:
                    decoded = None  # needed only to re-encode a rewritten body: hold less memory
                return self.flow.enqueue(
                    request, subset, len(body) if body else 0, (decoded, generated, started),
                    self.buffered_wait_s if timed else None,
                )  # fmt: skip
            decision = self._schedule(request, CycleState(), candidates, decoded, generated, started)
        except Rejection as rejection:
            if self.metrics:
                self.metrics.rejected(model, target, rejection.code)
            raise
        if self._flow_metrics is not None:
            self._flow_metrics.record(request, fc.DISPATCHED, 0.0)  # at once (a held one: by the queue)
        return decision

    def _schedule(
        self,
        request: SchedulingRequest,
        state: CycleState,
        candidates: list[Endpoint],
        decoded: dict | None,
        generated: bool,
        started: float,
    ) -> Decision:
        """Schedule among `candidates` and count the request in flight at the chosen endpoint."""
        scheduling_started = time.perf_counter()
        count = 1 + self.fallbacks
        result: SchedulingResult = self.scheduler.schedule(request, state, candidates, count=count)
        model, target = request.model, request.target_model
        if self.metrics:
            self.metrics.scheduled(time.perf_counter() - scheduling_started, result.plugin_seconds)
            self.metrics.started(model, target)
        chosen = result.endpoints[0]
        chosen.acquire(request.estimated_tokens)
        if self.gate is not None:
            self.gate.dispatched(chosen, request)
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

    # -- held requests (flow control) -------------------------------------------------------------------

    def _dispatch_held(self, item: QueuedRequest, candidates: list[Endpoint]) -> Decision:
        """The flow controller dispatches a held request: schedule it now, on `candidates` as they are now.
        A Rejection raised here reaches the client through `resume` (and is counted there)."""
        decoded, generated, started = item.payload
        return self._schedule(item.request, CycleState(), candidates, decoded, generated, started)

    def resume(self, item: QueuedRequest) -> Decision:
        """The outcome of a held request whose `ready` future is done: its decision, or raises the
        Rejection it got (429 / 503)."""
        if item.decision is not None:
            decision: Decision = item.decision
            return decision
        rejection = item.rejection
        if rejection is None:  # not settled: a caller bug
            raise RuntimeError(f"request {item.request.request_id} resumed before its outcome")
        if self.metrics:
            self.metrics.rejected(item.request.model, item.request.target_model, rejection.code)
        raise rejection

    def abandon(self, item: QueuedRequest) -> None:
        """The client went away while its request was held (or before the wire used its decision): free
        the queue slot at once, or release the endpoint it had been dispatched to."""
        if self.flow is None:
            return
        decision = self.flow.cancel(item)
        if decision is not None:
            item.decision = None
            self.finished(decision, 0)

    def _queue_snapshot(self) -> list[tuple[str, int, str, str, int, int]]:
        return self.flow.snapshot() if self.flow is not None else []

    def _pool_level(self) -> float:
        pool = self.pool.all()
        if self.gate is None or not pool:
            return 1.0 if not pool else 0.0
        return self.gate.saturation(None, pool)

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
        if self.gate is not None:
            self.gate.started(decision.endpoints[0])  # it left the server's queue: capacity may have freed
            if self.flow is not None and self.flow.size:
                self.flow.kick()
        if endpoint is None or not self._response_started:
            return
        seconds = time.perf_counter() - (decision.dispatched_at or decision.started)
        for hook in self._response_started:
            hook.response_started(decision.request, decision.state, endpoint, seconds)

    def finished(self, decision: Decision, status: int, followed_to_end: bool = True) -> None:
        """Exactly once per decided request, when the picker stops following it: its stream ended (success,
        error, or disconnect), or, `followed_to_end` False, the rest of the response passes without it."""
        endpoint = decision.served
        if self.gate is not None and endpoint is not None and not decision.first_byte:
            self.gate.started(decision.endpoints[0])  # ended without a first byte (error, client gone)
        if endpoint is not None:
            endpoint.release(decision.request.estimated_tokens)
            decision.served = None
            for hook in self._response_complete:
                hook.response_complete(decision.request, decision.state, endpoint, status)
        if self.metrics:
            error = None if 0 < status < 400 else ("client_disconnected" if status == 0 else f"http_{status}")
            duration = time.perf_counter() - decision.started if followed_to_end else None
            self.metrics.finished(decision.request.model, decision.request.target_model, duration, error)
        if self.flow is not None and self.flow.size:
            self.flow.kick()

    async def close(self) -> None:
        """On shutdown: requests held by flow control get 503 shutting_down now (and later arrivals that
        would have to wait get it at once); requests with room are still dispatched."""
        if self.flow is not None:
            await self.flow.close()

    async def close_plugins(self) -> None:
        """After the last stream: stop the plugins' background work (`Closes`)."""
        for plugin in self.scheduler.hooks(Closes):
            await plugin.aclose()

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
            if self.flow is None:
                self.admit(request, candidates)
            else:
                self._explain_flow(out, request, candidates, len(body) if body else 0)
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

    def _explain_flow(
        self, out: Explanation, request: SchedulingRequest, candidates: list[Endpoint], size: int
    ) -> None:
        """Flow control's verdict for `explain`, with its reason; raises the Rejection a request would get."""
        flow = self.flow
        assert flow is not None
        verdict, level = flow.assess(request, candidates)
        out.gate_saturation = level
        out.queued_ahead = flow.queued_ahead(request.priority) if flow.size else 0
        pool = self.config.pool.name
        if verdict == fc.GO:
            out.flow_control = "dispatch"
            out.flow_reason = (
                f"room: saturation {level:.2f} < 1.0 and nothing queued ahead"
                if candidates
                else "no endpoint at all and flow_control.no_endpoints_ttl_s is 0"
            )
            return
        out.flow_control = "reject"
        if verdict == fc.SHED:
            out.flow_reason = "a sheddable request while the pool is saturated (shedding thresholds)"
            raise fc.shed(request, level, pool)
        if verdict == fc.CLOSED:
            out.flow_reason = "the picker is shutting down"
            raise fc.shutting_down()
        problem = flow.limit_problem(request.priority, size)
        if problem is not None:
            out.flow_reason = f"a queue limit: {problem}"
            raise Rejection(429, "queue_full", f"flow control queue is full: {problem}")
        out.flow_control = "queue"
        ttl = self.config.flow_control.ttl_s
        if verdict == fc.HOLD_NO_ENDPOINTS:
            wait = self.config.flow_control.no_endpoints_ttl_s
            out.flow_reason = (
                f"no endpoint at all: waits up to {wait:g} s for one to appear (scale from zero)"
            )
        elif verdict == fc.HOLD_BEHIND:
            out.flow_reason = (
                f"{out.queued_ahead} requests of priority >= {request.priority} are queued ahead; "
                f"waits up to {ttl:g} s"
            )
        else:
            out.flow_reason = (
                f"pool '{pool}' is saturated for this request (saturation {level:.2f} >= 1.0, counting the "
                f"picker's own dispatches since the last scrape); waits up to {ttl:g} s"
            )


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
