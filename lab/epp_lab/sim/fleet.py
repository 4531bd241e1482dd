"""`SimFleet`: N simulated replicas in this process and event loop, each on its own listening socket.

Use:

    async with SimFleet(FleetConfig(replicas=4, time_scale=0.1)) as fleet:
        fleet.addresses   # ["127.0.0.1:41234", ...]
        fleet.stats()     # the /sim/stats document of every replica, plus totals
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from epp_lab.sim.config import FleetConfig
from epp_lab.sim.handlers import ReplicaServer
from epp_lab.sim.kvevents import KVEventPublisher
from epp_lab.sim.replica import Replica
from epp_lab.sim.stats import fleet_stats, replica_stats

SHUTDOWN_GRACE_S = 0.5
"""On stop, in-flight requests get this long (real seconds) to finish before they are cancelled."""


def bind_sockets(host: str, base_port: int, count: int) -> list[socket.socket]:
    """Bind `count` listening sockets: consecutive ports from `base_port`, or ephemeral ones when it is 0.

    Raises `OSError` naming the address that failed; sockets bound so far are closed.
    """
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            port = base_port + i if base_port else 0
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
            s.listen(1024)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _with_publishers(
    socks: list[socket.socket], c: FleetConfig, attempts: int = 20
) -> tuple[list[socket.socket], list[KVEventPublisher | None]]:
    """A KV-event publisher at each listening socket's port + `kv_events_port_offset`. With ephemeral
    ports, a socket whose publisher port is taken is swapped for a fresh one (up to `attempts` times)."""
    out: list[socket.socket] = []
    publishers: list[KVEventPublisher | None] = []
    try:
        for sock in socks:
            for attempt in range(attempts):
                port = sock.getsockname()[1]
                try:
                    publishers.append(KVEventPublisher(c.host, port + c.kv_events_port_offset))
                    break
                except OSError:
                    if c.base_port or attempt == attempts - 1:
                        raise
                    sock.close()
                    sock = bind_sockets(c.host, 0, 1)[0]
            out.append(sock)
    except BaseException:
        for pub in publishers:
            if pub is not None:
                pub.close()
        for s in [*out, *socks]:
            s.close()
        raise
    return out, publishers


@dataclass(slots=True)
class SimFleet:
    """N replicas in this process and event loop. Use `async with`, or `start()` / `stop()`."""

    config: FleetConfig = field(default_factory=FleetConfig)
    replicas: list[Replica] = field(default_factory=list)
    servers: list[ReplicaServer] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> None:
        c = self.config
        socks = bind_sockets(c.host, c.base_port, c.replicas)
        publishers: list[KVEventPublisher | None] = [None] * len(socks)
        try:
            if c.kv_events_port_offset:
                socks, publishers = _with_publishers(socks, c)
            for index, (sock, publisher) in enumerate(zip(socks, publishers, strict=True)):
                port = sock.getsockname()[1]
                replica = Replica(c, index)
                replica.publisher = publisher
                server = ReplicaServer(replica, port, self.stats)
                # handler_cancellation: a client that goes away cancels its handler, which aborts its request.
                runner = web.AppRunner(
                    server.app,
                    handle_signals=False,
                    access_log=None,
                    handler_cancellation=True,
                    shutdown_timeout=SHUTDOWN_GRACE_S,
                )
                await runner.setup()
                self._runners.append(runner)
                await web.SockSite(runner, sock).start()
                replica.start()
                self.replicas.append(replica)
                self.servers.append(server)
                host = f"[{c.host}]" if ":" in c.host else c.host
                self.addresses.append(f"{host}:{port}")
        except BaseException:
            await self.stop()
            for s in socks:
                s.close()
            for pub in publishers:
                if pub is not None:
                    pub.close()
            raise

    async def stop(self) -> None:
        """Close the listeners, let in-flight requests finish for `SHUTDOWN_GRACE_S`, stop the engines."""
        await asyncio.gather(*(r.cleanup() for r in self._runners), return_exceptions=True)
        self._runners.clear()
        for replica in self.replicas:
            await replica.stop()
            if replica.publisher is not None:
                replica.publisher.close()
                replica.publisher = None

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        """`{"replicas": [per-replica /sim/stats], "total": {summed counters, prefix_hit_rate}}`."""
        return fleet_stats([replica_stats(r, a) for r, a in zip(self.replicas, self.addresses, strict=True)])
