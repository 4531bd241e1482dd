"""Names of the headers and metadata the picker reads and writes (GIE endpoint-picker protocol).

Upstream (now the llm-d router) renamed the request headers in 2026 and still accepts the old ones.
"""

from __future__ import annotations

# Request headers the picker reads.
REQUEST_ID = "x-request-id"  # generated when absent, and returned to the client
OBJECTIVE = "x-gateway-inference-objective"  # name of an objective → priority
MODEL_REWRITE = "x-gateway-model-name-rewrite"  # a pre-set target model

# What the picker answers.
DESTINATION = "x-gateway-destination-endpoint"  # ip:port (or an ordered fallback list) to route to
REJECT_REASON = "x-epp-reject-reason"  # the machine-readable code of a rejection
