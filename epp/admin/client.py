"""`epp explain` and `epp endpoints`: ask a running picker's admin API and print tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from epp._generated import epp_admin_pb2 as pb
from epp._generated import epp_admin_pb2_grpc as pb_grpc
from epp.config import ADMIN_PORT

DEFAULT_ADMIN = f"127.0.0.1:{ADMIN_PORT}"
TOKEN_ENV = "EPP_ADMIN_TOKEN"


def _stub(address: str) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(grpc.insecure_channel(address))


def format_endpoints(response: pb.ListEndpointsResponse) -> str:
    head = (
        f"{'endpoint':<22} {'engine':<8} {'up':<3} {'age':>7} {'waiting':>7} {'running':>7} {'kv':>5} "
        f"{'inflight':>8} {'tokens':>7} {'sat':>5}  loras (running / waiting)  plugin details"
    )
    lines = [f"pool {response.pool}: saturation {response.pool_saturation:.2f}", head, "-" * len(head)]
    for e in response.endpoints:
        age = "never" if e.metrics_age_s < 0 else f"{e.metrics_age_s * 1000:.0f}ms"
        loras = ",".join(e.running_loras) or "-"
        if e.waiting_loras:
            loras += " / " + ",".join(e.waiting_loras)
        details = " ".join(f"{k}={v:g}" for k, v in sorted(e.details.items()))
        lines.append(
            f"{e.address:<22} {e.engine:<8} {'yes' if e.reachable else 'NO':<3} {age:>7} {e.waiting:>7g} "
            f"{e.running:>7g} {e.kv_usage:>5.2f} {e.inflight_requests:>8} {e.inflight_tokens:>7} "
            f"{e.saturation:>5.2f}  {loras:<24}  {details}"
        )
    return "\n".join(lines)


def format_explain(response: pb.ExplainResponse) -> str:
    lines = []
    if response.status != 200:
        lines.append(f"=> {response.status} {response.error_code}: {response.error_message}")
    elif response.flow_control == "queue":
        lines.append(f"=> queued by flow control (if dispatched now: {response.destination})")
    else:
        lines.append(f"=> {response.destination}")
    if response.flow_control and response.flow_control != "off":
        lines.append(
            f"flow control: {response.flow_control}: {response.flow_reason} (gate saturation "
            f"{response.gate_saturation:.2f}, {response.queued_ahead} queued ahead)"
        )
    lines.append(
        f"model {response.model!r} -> {response.target_model!r}, priority {response.priority}, "
        f"~{response.prompt_tokens} prompt tokens, pool saturation {response.pool_saturation:.2f}"
    )
    if response.details:
        lines.append("request: " + " ".join(f"{k}={v:g}" for k, v in sorted(response.details.items())))
    scorers = sorted(response.weights)
    head = f"{'rank':>4} {'endpoint':<22} " + " ".join(
        f"{s}(x{response.weights[s]:g})"[:18].rjust(18) for s in scorers
    )
    head += f" {'total':>7}  note"
    lines += [head, "-" * len(head)]
    for c in response.candidates:
        scores = " ".join(f"{c.scores[s]:>18.3f}" if s in c.scores else f"{'':>18}" for s in scorers)
        note = f"dropped by {c.dropped_by}" if c.dropped_by else ""
        if c.details:
            note += " ".join(f"{k}={v:.4g}" for k, v in sorted(c.details.items()))
        rank = str(c.rank) if c.rank else ""
        lines.append(f"{rank:>4} {c.address:<22} {scores} {c.total:>7.3f}  {note}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="epp", description="Query a running picker's admin API.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("endpoints", "list endpoints with their latest metrics, metric age and in-flight counts"),
        ("explain", "show where a request would go and every candidate's per-scorer scores"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--admin", default=DEFAULT_ADMIN, help=f"the picker's admin API (default {DEFAULT_ADMIN})"
        )
        p.add_argument(
            "--token-file",
            help=f"bearer token for an admin API with server.admin_token_file (default: ${TOKEN_ENV} if set)",
        )
        p.add_argument("--json", action="store_true", help="print the raw response as JSON")
        if name == "explain":
            p.add_argument("--model", default="m", help="model name (when no --body-file)")
            p.add_argument("--prompt", default="hello", help="user message (when no --body-file)")
            p.add_argument("--body-file", help="a JSON request body to explain instead")
            p.add_argument("--path", default="/v1/chat/completions")
            p.add_argument("-H", "--header", action="append", default=[], help="request header 'name: value'")
            p.add_argument("--subset", help="gateway subset hint, comma-separated ip:port")
    args = parser.parse_args(argv)
    stub = _stub(args.admin)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            print(f"epp {args.command}: cannot read {args.token_file}: {err.strerror}", file=sys.stderr)
            return 2
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        if args.command == "endpoints":
            listed = stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5, metadata=metadata)
            text = format_endpoints(listed)
            message = listed
        else:
            if args.body_file:
                body = Path(args.body_file).read_bytes()
            else:
                body = json.dumps(
                    {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
                ).encode()
            headers = {}
            for item in args.header:
                key, _, value = item.partition(":")
                headers[key.strip().lower()] = value.strip()
            request = pb.ExplainRequest(path=args.path, headers=headers, body=body)
            if args.subset is not None:
                request.has_subset = True
                request.subset.extend(a.strip() for a in args.subset.split(",") if a.strip())
            explained = stub.Explain(request, timeout=5, metadata=metadata)
            text = format_explain(explained)
            message = explained
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = f"the admin API wants a bearer token: --token-file or ${TOKEN_ENV}"
            print(f"epp {args.command}: {args.admin}: UNAUTHENTICATED ({hint})", file=sys.stderr)
            return 1
        print(f"epp {args.command}: cannot reach the admin API at {args.admin}: {code.name}", file=sys.stderr)
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(message))
    else:
        print(text)
    return 0
