"""The admin gRPC API: list endpoints, and explain a scheduling decision without routing anything.

Explain is the request director's own dry run (`Director.explain`): the same steps in the same order."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from epp._generated import epp_admin_pb2 as pb
from epp._generated import epp_admin_pb2_grpc as pb_grpc
from epp.scheduling.interfaces import EndpointDetails

if TYPE_CHECKING:
    from epp.server import Server


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, server: Server) -> None:
        self.server = server

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: Any) -> pb.ListEndpointsResponse:
        return list_endpoints(self.server)

    async def Explain(self, request: pb.ExplainRequest, context: Any) -> pb.ExplainResponse:
        return explain(self.server, request)


def list_endpoints(server: Server) -> pb.ListEndpointsResponse:
    now = time.monotonic()
    detector = server.director.detector
    staleness = detector.staleness(len(server.pool))
    plugins = server.scheduler.hooks(EndpointDetails)
    out = pb.ListEndpointsResponse(
        pool=server.config.pool.name, pool_saturation=detector.saturation(server.pool.all(), now)
    )
    for e in server.pool:
        m = e.metrics
        age = m.age(now)
        details: dict[str, float] = {}
        for plugin in plugins:
            name = getattr(plugin, "name", type(plugin).__name__)
            details.update({f"{name}.{k}": v for k, v in plugin.endpoint_details(e).items()})
        out.endpoints.append(
            pb.EndpointInfo(
                address=e.address,
                engine=e.engine,
                reachable=e.reachable,
                metrics_age_s=-1.0 if age == float("inf") else age,
                waiting=m.waiting,
                running=m.running,
                kv_usage=m.kv_usage,
                running_loras=sorted(m.running_loras),
                waiting_loras=sorted(m.waiting_loras),
                max_lora=m.max_lora,
                inflight_requests=e.inflight_requests,
                inflight_tokens=e.inflight_tokens,
                saturation=detector.endpoint_saturation(e, now, staleness),
                details=details,
            )
        )
    return out


def explain(server: Server, request: pb.ExplainRequest) -> pb.ExplainResponse:
    """Where the request would go and why; learns nothing, counts nothing."""
    director = server.director
    headers = dict(request.headers)
    headers.setdefault(":path", request.path or "/v1/chat/completions")
    subset = frozenset(request.subset) if request.has_subset else None
    result = director.explain(headers, request.body if request.body else None, subset)
    out = pb.ExplainResponse(pool_saturation=result.pool_saturation)
    for scorer, weight in director.scheduler.scorers:
        out.weights[scorer.name] = weight
    out.flow_control, out.flow_reason = result.flow_control, result.flow_reason
    out.gate_saturation, out.queued_ahead = result.gate_saturation, result.queued_ahead
    if result.request is not None:
        sreq = result.request
        out.model, out.target_model, out.priority = sreq.model, sreq.target_model, sreq.priority
        out.prompt_tokens = sreq.prompt_tokens
    if result.rejection is not None:
        rejection = result.rejection
        out.status, out.error_code, out.error_message = rejection.status, rejection.code, rejection.message
        return out
    out.status = 200
    out.destination = result.destination
    out.details.update(result.details)
    ranks = {e.address: i + 1 for i, e in enumerate(result.endpoints)}
    for c in sorted(result.candidates, key=lambda c: (c.dropped_by is not None, -c.total)):
        out.candidates.append(
            pb.CandidateScore(
                address=c.address,
                dropped_by=c.dropped_by or "",
                scores=c.scores,
                total=c.total,
                rank=ranks.get(c.address, 0),
                details=c.details,
            )
        )
    return out


def register_admin(grpc_server: Any, server: Server) -> None:
    pb_grpc.add_AdminServicer_to_server(AdminService(server), grpc_server)
