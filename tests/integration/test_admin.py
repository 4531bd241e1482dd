"""The admin gRPC API of a running picker: list endpoints, explain a decision; and its generated code."""

from __future__ import annotations

import json

import grpc
import pytest

from epp._generated import epp_admin_pb2 as pb
from epp._generated import epp_admin_pb2_grpc as pb_grpc
from epp.admin import codegen
from epp.admin.client import format_endpoints, format_explain
from epp.config import load_config
from epp.server import Server


@pytest.fixture
async def picker(upstreams):
    ups = await upstreams(3)
    ups[0].metrics.waiting = 9
    ups[2].metrics.kv_usage = 0.5
    config = load_config(None, {
        "server": {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "tls": {"enabled": False}},
        "pool": {"endpoints": [u.address for u in ups]},
        "scheduling": {"seed": 3},
    })  # fmt: skip
    server = Server(config)
    ports = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports.admin}")
    yield server, pb_grpc.AdminStub(channel), ups
    await channel.close()
    await server.stop()


async def test_list_endpoints_shows_metrics_age_and_inflight(picker) -> None:
    server, stub, ups = picker
    server.pool.get(ups[1].address).acquire(100)
    response = await stub.ListEndpoints(pb.ListEndpointsRequest())
    by_address = {e.address: e for e in response.endpoints}
    assert by_address[ups[0].address].waiting == 9
    assert by_address[ups[2].address].kv_usage == 0.5
    assert by_address[ups[1].address].inflight_requests == 1
    assert by_address[ups[1].address].inflight_tokens == 100
    assert all(0 <= e.metrics_age_s < 5 and e.reachable for e in response.endpoints)
    assert ups[0].address in format_endpoints(response)


async def test_explain_gives_the_choice_and_every_candidates_scores(picker) -> None:
    server, stub, ups = picker
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 500}]}).encode()
    response = await stub.Explain(pb.ExplainRequest(path="/v1/chat/completions", body=body))
    assert response.status == 200
    assert response.destination == ups[1].address  # empty queue and empty KV
    scored = {c.address: c for c in response.candidates}
    assert scored[ups[0].address].scores["queue"] == 0.0
    assert scored[ups[1].address].scores["queue"] == 1.0
    assert scored[ups[2].address].scores["kv-cache"] == pytest.approx(0.5)
    assert scored[ups[1].address].rank == 1
    assert response.weights["prefix-cache"] == 6
    # Explaining changes nothing: no in-flight count, nothing learned by the prefix index.
    assert all(e.inflight_requests == 0 for e in server.pool)
    assert server.scheduler.scorers[0][0].index.stats()["total_entries"] == 0
    assert "=> " + ups[1].address in format_explain(response)


async def test_explain_reports_rejections_and_dropping_filters(picker) -> None:
    _, stub, ups = picker
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    response = await stub.Explain(pb.ExplainRequest(path="/v1/completions", body=body, has_subset=True,
                                                    subset=[ups[2].address]))  # fmt: skip
    assert response.destination == ups[2].address
    dropped = {c.address: c.dropped_by for c in response.candidates}
    assert dropped[ups[0].address] == "subset-hint" and dropped[ups[2].address] == ""
    bad = await stub.Explain(pb.ExplainRequest(path="/v1/completions", body=b"{"))
    assert (bad.status, bad.error_code) == (400, "bad_request")


def test_generated_admin_code_is_up_to_date() -> None:
    assert codegen.main(["--check"]) == 0
