"""The static pool: the endpoints listed in `pool.endpoints` (local runs, tests, fixed fleets)."""

from __future__ import annotations

from epp.config import PoolConfig
from epp.datalayer.endpoints import Endpoint


def static_endpoints(pool: PoolConfig) -> list[Endpoint]:
    """One `Endpoint` per configured address; none with `pool.discovery: kubernetes` (the pool starts empty
    and fills from the InferencePool)."""
    if pool.discovery != "static":
        return []
    return [Endpoint(e.address, e.engine) for e in pool.endpoints]
