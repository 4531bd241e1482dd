"""Names of the headers and metadata the picker reads and writes (GIE endpoint-picker protocol).

Upstream (now the llm-d router) renamed the request headers in 2026 and still accepts the old ones; so do
we: each request header is a tuple of names, the current one first, and the first one present wins.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def first(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The value of the first of `names` present in `headers` (None if none is)."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None
