"""The routers under test. `start(arm, workers)` is an async context manager yielding the ingress URL and
the pids of the arm's processes (for CPU accounting); everything it starts is stopped on exit.

    round-robin      Envoy `direct` shape, ROUND_ROBIN (the "Kubernetes Service" baseline)
    least-request    Envoy `direct` shape, LEAST_REQUEST (Envoy's default: power of two choices)
    vllm-router      PyPI vllm-router, --policy cache_aware, run unmodified (see peers.py)
    sglang-router    PyPI sglang-router (smg), launch --policy cache_aware, run unmodified
    epp*             Envoy `gateway` shape (ext_proc FULL_DUPLEX_STREAMED) + `epp serve --config
                     configs/<arm>.yaml`: `epp` (defaults), `epp-prefix-only`, `epp-load-only`, and any
                     other configs/epp-*.yaml (the tuning variants)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.routing import peers
from epp_lab import procs
from epp_lab.envoy_launcher import Envoy, EnvoyOptions, free_port

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENVOY_ARMS = {"round-robin": "ROUND_ROBIN", "least-request": "LEAST_REQUEST"}
PEER_ARMS = tuple(peers.PINS)
EPP_ARMS = ("epp", "epp-latency")  # more: any configs/epp-*.yaml (ablations, tuning)
ALL_ARMS = (*ENVOY_ARMS, *PEER_ARMS, *EPP_ARMS)


class ArmError(RuntimeError):
    """The arm could not be started; the message says why (recorded in the results)."""


@dataclass(slots=True)
class Running:
    url: str
    pids: dict[str, int] = field(default_factory=dict)


def epp_config(arm: str) -> Path:
    path = CONFIG_DIR / f"{arm}.yaml"
    if not path.exists():
        raise ArmError(f"no picker config {path} for arm {arm!r}")
    return path


def epp_scorers(arm: str) -> list[str]:
    """The effective scorers of an epp arm, e.g. ["prefix-cache x6 {'load_gap': 4}", ...]."""
    from epp.config import load_config

    config = load_config(epp_config(arm))
    return [
        f"{s.type} x{s.weight:g}" + (f" {s.params}" if s.params else "") for s in config.scheduling.scorers
    ]


def sim_options(arm: str) -> dict[str, Any]:
    """`epp sim` options an arm needs beyond the workload's: KV-cache events on the port offset of the
    arm's `precise-prefix-cache` scorer, if it has one."""
    if not arm.startswith("epp"):
        return {}
    from epp.config import load_config

    for s in load_config(epp_config(arm)).scheduling.scorers:
        if s.type == "precise-prefix-cache":
            return {"kv_events_port_offset": int(s.params.get("events_port_offset", 0)) or None}
    return {}


def known(arm: str) -> bool:
    return (
        arm in ENVOY_ARMS
        or arm in PEER_ARMS
        or (arm.startswith("epp") and (CONFIG_DIR / f"{arm}.yaml").exists())
    )


@asynccontextmanager
async def start(
    arm: str, workers: list[str], seed: int, statuses: dict[str, peers.PeerStatus]
) -> AsyncIterator[Running]:
    if arm in ENVOY_ARMS:
        options = EnvoyOptions(shape="direct", pool=workers, lb_policy=ENVOY_ARMS[arm])
        async with Envoy(options) as envoy:
            assert envoy.pid is not None
            yield Running(envoy.url, {"envoy": envoy.pid})
    elif arm in PEER_ARMS:
        status = statuses.get(arm)
        if status is None or status.binary is None:
            raise ArmError(status.problem if status else f"{arm} was not set up")
        async with _peer(arm, status.binary, workers) as running:
            yield running
    elif arm.startswith("epp"):
        async with procs.picker(workers, config=epp_config(arm), extra=["--seed", str(seed)]) as picker:
            options = EnvoyOptions(shape="gateway", epp_port=picker.info["extproc"], pool=workers)
            async with Envoy(options) as envoy:
                assert picker.pid is not None and envoy.pid is not None
                yield Running(envoy.url, {"picker": picker.pid, "envoy": envoy.pid})
    else:
        raise ArmError(f"unknown arm {arm!r}")


@asynccontextmanager
async def _peer(arm: str, binary: str, workers: list[str], timeout: float = 60.0) -> AsyncIterator[Running]:
    """A peer router as a child process, ready once its /health answers 200."""
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    peer = procs.Child(
        arm,
        peers.command(arm, binary, workers, port, metrics_port),
        ready_url=url + "/health",
        timeout=timeout,
        stop_timeout=10.0,
    )
    try:
        await peer.start()
    except procs.ProcessError as err:
        raise ArmError(str(err)) from None
    try:
        assert peer.pid is not None
        yield Running(url, {arm: peer.pid})
    finally:
        await peer.stop()
