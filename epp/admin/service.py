"""The admin gRPC API: list endpoints, and explain a scheduling decision without routing anything."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from epp._generated import epp_admin_pb2 as pb
from epp._generated import epp_admin_pb2_grpc as pb_grpc
from epp.errors import Rejection

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
    detector = server.pipeline.detector
    staleness = detector.staleness(len(server.pool))
    out = pb.ListEndpointsResponse(
        pool=server.config.pool.name, pool_saturation=detector.saturation(server.pool.all(), now)
    )
    for e in server.pool:
        m = e.metrics
        age = m.age(now)
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
                prefix_index_blocks=server.prefix_index.entries(e.address),
                saturation=detector.endpoint_saturation(e, now, staleness),
            )
        )
    return out


def explain(server: Server, request: pb.ExplainRequest) -> pb.ExplainResponse:
    """Run parse → route → admission → scheduling with `explain=True`; learns nothing, counts nothing."""
    pipeline = server.pipeline
    headers = dict(request.headers)
    headers.setdefault(":path", request.path or "/v1/chat/completions")
    subset = frozenset(request.subset) if request.has_subset else None
    out = pb.ExplainResponse(pool_saturation=pipeline.detector.saturation(server.pool.all()))
    for scorer, weight in pipeline.scheduler.scorers:
        out.weights[scorer.name] = weight
    try:
        sreq, _, _ = pipeline.prepare(headers, request.body if request.body else None, subset)
        out.model, out.target_model, out.priority = sreq.model, sreq.target_model, sreq.priority
        out.prompt_tokens = sreq.prompt_tokens
        pipeline.admit(sreq, server.pool.all())
        result = pipeline.scheduler.schedule(
            sreq, server.pool.all(), count=1 + pipeline.fallbacks, explain=True
        )
    except Rejection as rejection:
        out.status, out.error_code, out.error_message = rejection.status, rejection.code, rejection.message
        return out
    out.prompt_blocks = len(sreq.prefix_hashes or [])
    out.status = 200
    out.destination = ",".join(e.address for e in result.endpoints)
    ranks = {e.address: i + 1 for i, e in enumerate(result.endpoints)}
    for c in sorted(result.explanation or [], key=lambda c: (c.dropped_by is not None, -c.total)):
        out.candidates.append(
            pb.CandidateScore(
                address=c.address,
                dropped_by=c.dropped_by or "",
                scores=c.scores,
                total=c.total,
                rank=ranks.get(c.address, 0),
            )
        )
    return out


def register_admin(grpc_server: Any, server: Server) -> None:
    pb_grpc.add_AdminServicer_to_server(AdminService(server), grpc_server)
