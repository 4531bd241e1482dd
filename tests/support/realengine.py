"""Helpers of the real-engine tier (tests/realengine): polling under a hang guard, HTTP, vLLM counters, and
the picker + real Envoy in front of the replicas."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp_lab.realengine.replicas import KV_PORT_OFFSET, REPLAY_PORT_OFFSET

HANG_GUARD_S = 120.0  # generous: the machine is shared and the engines run on 2 cores


async def until(condition: Callable[[], Any], what: str, guard: float = HANG_GUARD_S) -> None:
    """Poll `condition` (sync or async) until true; fail naming `what` after the guard (a hang, not a
    timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {guard:g} s")
        await asyncio.sleep(0.05)


async def post(url: str, body: Any, timeout: float = HANG_GUARD_S) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(url, data=data, headers={"content-type": "application/json"}) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200, url
        return await r.text()


_COUNTER = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)


async def counters(urls: list[str], *names: str) -> dict[str, float]:
    """Sum over `urls` of the named vLLM counters (all series)."""
    totals = dict.fromkeys(names, 0.0)
    for url in urls:
        for name, value in _COUNTER.findall(await get_text(url + "/metrics")):
            if name in totals:
                totals[name] += float(value)
    return totals


def picker_config(addresses: list[str], scorers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from epp.config import ServerConfig

    ports = {name: 0 for name in ServerConfig.model_fields if name.endswith("_port")}  # every port ephemeral
    config: dict[str, Any] = {
        "server": {**ports, "tls": {"enabled": False}, "grace_period_s": 1},
        "pool": {"endpoints": addresses},
        "scheduling": {"seed": 11},
    }
    if scorers is not None:
        config["scheduling"]["scorers"] = scorers
    return config


def precise_scorers(model_dir: Path) -> list[dict[str, Any]]:
    """The default profile with `precise-prefix-cache` in place of `prefix-cache`."""
    params = {
        "load_gap": 4,
        "tokenizer": str(model_dir),
        "events_port_offset": KV_PORT_OFFSET,
        "replay_port_offset": REPLAY_PORT_OFFSET,
        "base_model": "base",
    }
    return [
        {"type": "precise-prefix-cache", "weight": 6, "params": params},
        {"type": "queue", "weight": 2},
        {"type": "kv-cache", "weight": 2},
        {"type": "lora-affinity", "weight": 4, "params": {"free_slot": 0.4, "waiting": 0.6}},
        {"type": "inflight", "weight": 1},
    ]


class Gateway:
    """The picker (in-process `Server`) and a real Envoy in front of `addresses`, or Envoy alone
    (`shape="direct"`, round-robin)."""

    def __init__(
        self, addresses: list[str], shape: str = "gateway", scorers: list[dict[str, Any]] | None = None
    ):
        self.addresses = addresses
        self.shape = shape
        self.scorers = scorers
        self.server: Any = None
        self.envoy: Any = None

    @property
    def url(self) -> str:
        return str(self.envoy.url)

    async def __aenter__(self) -> Gateway:
        from epp.config import load_config
        from epp.server import Server
        from epp_lab.envoy_launcher import Envoy, EnvoyOptions

        if self.shape == "direct":
            self.envoy = Envoy(EnvoyOptions(shape="direct", pool=self.addresses, lb_policy="ROUND_ROBIN"))
        else:
            self.server = Server(load_config(None, picker_config(self.addresses, self.scorers)))
            ports = await self.server.start()
            # Envoy's default ext_proc message_timeout (200 ms) is a deployment's latency budget; this tier
            # checks behaviour, on 2 shared cores next to the engines (and deliberately starved in runs with
            # busy loops), so a slow reply must not turn into a 504 here.
            self.envoy = Envoy(
                EnvoyOptions(
                    shape=self.shape,
                    epp_port=ports.extproc,
                    pool=self.addresses,
                    extproc={"message_timeout": "10s"},
                )
            )
        try:
            await self.envoy.start()
        except BaseException:
            await self._stop_server()
            raise
        return self

    async def _stop_server(self) -> None:
        if self.server is None:
            return
        await self.server.stop()
        for plugin in self.server.scheduler.plugins:
            close = getattr(plugin, "aclose", None)
            if close is not None:
                await close()

    async def __aexit__(self, *exc: object) -> None:
        await self.envoy.stop()
        await self._stop_server()
