"""Names of the headers and metadata the picker reads and writes (GIE endpoint-picker protocol), and which of
them a client may set.

Upstream (now the llm-d router) renamed the request headers in 2026 and still accepts the old ones; so do
we: each request header is a tuple of names, the current one first, and the first one present wins.

Who may set what (`security.trusted_control_headers`, README "Security and threat model"): the picker cannot
tell a client's header from one the gateway set, so a control header is either honoured as it arrives or
ignored and removed from the request before it goes upstream. Honoured by default: the objective (a client
chooses among the objectives the operator defined, as in GIE), the fairness id (it only matters with flow
control; a gateway that derives it from the caller's identity overwrites the client's value) and the latency
objectives (a scorer's preference). Ignored by default: the model-name rewrite, which would let a client
bypass the model rules (reach any model or adapter the servers load, skip a canary split, avoid a 404); turn
it on only behind a gateway that sets it and strips the client's copy. The destination, subset and served
headers are never read from request headers (the picker reads the gateway's subset and served endpoint from
Envoy metadata, which clients cannot write; it overwrites the destination header) and are removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Request headers the picker reads.
REQUEST_ID = "x-request-id"  # generated when absent, and returned to the client
OBJECTIVE = ("x-llm-d-inference-objective", "x-gateway-inference-objective")  # objective name → priority
FAIRNESS_ID = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")  # flow-control tenant
MODEL_REWRITE = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")  # a pre-set target model
SLO_TTFT_MS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")  # time-to-first-token objective, milliseconds
SLO_TPOT_MS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")  # time-per-output-token objective, milliseconds

# What the picker answers.
DESTINATION = "x-gateway-destination-endpoint"  # ip:port (or an ordered fallback list) to route to
REJECT_REASON = "x-epp-reject-reason"  # the machine-readable code of a rejection
DROPPED_REASON = "x-llm-d-request-dropped-reason"  # on 429/503 drops: why (same code as REJECT_REASON)

DEFAULT_FAIRNESS_ID = "default-flow"

# Control headers by the name `security.trusted_control_headers` lists them with.
CONTROL_HEADERS: dict[str, tuple[str, ...]] = {
    "objective": OBJECTIVE,
    "fairness_id": FAIRNESS_ID,
    "slo": SLO_TTFT_MS + SLO_TPOT_MS,
    "model_rewrite": MODEL_REWRITE,
}
TRUSTED_BY_DEFAULT = ("objective", "fairness_id", "slo")
# Only the gateway speaks these, and never as request headers: removed from every request going upstream.
DESTINATION_SUBSET = "x-gateway-destination-endpoint-subset"
DESTINATION_SERVED = "x-gateway-destination-endpoint-served"
NEVER_FROM_CLIENTS = (DESTINATION_SUBSET, DESTINATION_SERVED)

_REQUEST_ID = re.compile(r"[!-~]{1,256}")  # visible ASCII, at most 256 characters


def untrusted_headers(trusted: Iterable[str]) -> tuple[str, ...]:
    """Request header names the picker ignores and removes, given the trusted control-header groups."""
    names = [name for group, group_names in CONTROL_HEADERS.items() if group not in trusted
             for name in group_names]  # fmt: skip
    return (*names, *NEVER_FROM_CLIENTS)


def valid_request_id(value: str) -> bool:
    """A request id the picker keeps and echoes: 1-256 visible ASCII characters. Anything else (control
    characters, non-ASCII, huge) is replaced by a generated id, so no client bytes reach a reply header."""
    return _REQUEST_ID.fullmatch(value) is not None


def first(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The value of the first of `names` present in `headers` (None if none is)."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None
