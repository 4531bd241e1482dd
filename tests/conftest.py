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
