"""Shared fixtures: small real HTTP model-server stand-ins, the picker in-process, and real Envoy."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/support importable as `support`

from support.upstream import Upstream


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await upstreams(n)` → n running Upstream servers, stopped after the test."""
    started: list[Upstream] = []

    async def make(count: int = 1, **kwargs: Any) -> list[Upstream]:
        batch = [Upstream(**kwargs) for _ in range(count)]
        await asyncio.gather(*(u.start() for u in batch))
        started.extend(batch)
        return batch

    yield make
    await asyncio.gather(*(u.stop() for u in started))


@pytest.fixture
async def stack() -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await stack(addresses, shape="gateway", **config)` → (picker Server, Envoy) running
    in-process / as a real Envoy subprocess; both stopped after the test."""
    from epp.config import load_config
    from epp.server import Server
    from epp_lab.envoy_launcher import Envoy, EnvoyOptions

    running: list[Any] = []

    async def make(
        addresses: list[str],
        shape: str = "gateway",
        extra_http_filters: list[dict[str, Any]] | None = None,
        tls: bool = False,
        envoy: dict[str, Any] | None = None,
        **config: Any,
    ) -> tuple[Any, Any]:
        """`envoy`: more EnvoyOptions (e.g. processing_mode, extproc); the rest overrides the picker's
        config."""
        overrides: dict[str, Any] = {
            "server": {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "tls": {"enabled": tls},
                       "grace_period_s": 1},
            "pool": {"endpoints": addresses},
            "scheduling": {"seed": 11, "scrape": {"interval_s": 0.02}},
        }  # fmt: skip
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(overrides.get(key), dict):
                overrides[key] = {**overrides[key], **value}
            else:
                overrides[key] = value
        server = Server(load_config(None, overrides))
        ports = await server.start()
        running.append(server)
        proxy = Envoy(
            EnvoyOptions(
                shape=shape, epp_port=ports.extproc, epp_tls=tls, pool=addresses,
                extra_http_filters=extra_http_filters or [], **(envoy or {}),
            )
        )  # fmt: skip
        await proxy.start()
        running.append(proxy)
        return server, proxy

    yield make
    for item in reversed(running):
        await item.stop()
