"""The picker's process: explicit start-up, serve, and graceful shutdown.

Start-up builds the data layer (the endpoint pool), the scheduler and its plugins from the config and the
request director, then opens three ports: ext_proc (gRPC, TLS unless disabled), health + admin API (gRPC,
plaintext) and Prometheus metrics (HTTP). Readiness turns SERVING once the pool is synced. Shutdown marks
readiness NOT_SERVING, stops accepting streams and gives in-flight streams `grace_period_s` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from epp.config import Config, ConfigError
from epp.datalayer.discovery.static import static_endpoints
from epp.datalayer.endpoints import EndpointPool
from epp.extproc.servicer import EXTPROC_SERVICE, ExtProcServicer
from epp.observability.metrics import ExtProcCollector, PoolCollector, RequestMetrics
from epp.requestcontrol.director import Director
from epp.scheduling.interfaces import EndpointDetails
from epp.scheduling.registry import PluginContext, build_scheduler
from epp.tls import load_key_and_cert

log = logging.getLogger(__name__)

HEALTH_NAMES = ("liveness", "readiness", EXTPROC_SERVICE)


@dataclass(slots=True)
class BoundPorts:
    extproc: int
    health: int
    metrics: int


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        # With Kubernetes discovery the pool starts empty and fills from the InferencePool.
        self.pool = EndpointPool(static_endpoints(config.pool))
        self.registry = CollectorRegistry()
        self.request_metrics = RequestMetrics(self.registry)
        ctx = PluginContext(config, self.pool, random.Random(config.scheduling.seed))
        self.scheduler = build_scheduler(ctx, time_plugins=True)
        self.director = Director(config, self.pool, self.scheduler, self.request_metrics)
        self.registry.register(
            PoolCollector(self.pool, config.pool.name, self.director.detector.staleness, self._plugin_gauges)
        )
        self.servicer = ExtProcServicer(self.director, config.limits, config.response)
        self.registry.register(ExtProcCollector(self.servicer))
        self.health = HealthServicer()
        self.scraper: object | None = None
        self.discovery: Any = None
        self._grpc: grpc.aio.Server | None = None
        self._ops: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._background: list[asyncio.Future[None]] = []
        self.ports: BoundPorts | None = None

    def _plugin_gauges(self) -> dict[str, float]:
        """Pool-level gauges the plugins keep (e.g. the prefix index's size), computed at scrape time."""
        out: dict[str, float] = {}
        for plugin in self.scheduler.hooks(EndpointDetails):
            out.update(plugin.gauges())
        return out

    async def start(self) -> BoundPorts:
        cfg = self.config.server
        self._grpc = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]
        )
        self.servicer.add_to_server(self._grpc)
        address = f"{cfg.host}:{cfg.extproc_port}"
        if cfg.tls.enabled:
            credentials = grpc.ssl_server_credentials([load_key_and_cert(cfg.tls)])
            extproc_port = self._grpc.add_secure_port(address, credentials)
        else:
            extproc_port = self._grpc.add_insecure_port(address)

        self._ops = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._ops)
        from epp.admin.service import register_admin

        register_admin(self._ops, self)
        health_port = self._ops.add_insecure_port(f"{cfg.host}:{cfg.health_port}")

        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, cfg.host, cfg.metrics_port, reuse_port=False)
        await site.start()
        metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        await self._grpc.start()
        await self._ops.start()
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        await self._start_scraper()
        if self.config.pool.discovery == "kubernetes":
            await self._start_discovery()
        else:
            await self._set_ready(self.pool.synced)
        self.ports = BoundPorts(extproc_port, health_port, metrics_port)
        log.info(
            "epp serving: ext_proc %s:%d (%s), health/admin :%d, metrics :%d, %d endpoints",
            cfg.host, extproc_port, "TLS" if cfg.tls.enabled else "plaintext", health_port, metrics_port,
            len(self.pool),
        )  # fmt: skip
        return self.ports

    async def _start_scraper(self) -> None:
        from epp.datalayer.scrape.scraper import MetricsScraper

        scraper = MetricsScraper(self.pool, self.config.scheduling.scrape)
        # Readiness waits for one scrape of every endpoint (success or failure), bounded by the timeout.
        await scraper.scrape_all()
        await scraper.start()
        self.scraper = scraper

    async def _start_discovery(self) -> None:
        """Follow the InferencePool; readiness turns SERVING after the first full sync of its pods."""
        from epp.datalayer.discovery.kubernetes import InferencePoolDiscovery

        await self._set_ready(False)
        self.discovery = InferencePoolDiscovery(self.pool, self.config.pool.kubernetes)
        await self.discovery.start()

        async def ready_when_synced() -> None:
            await self.discovery.synced.wait()
            await self._set_ready(True)

        self._background.append(asyncio.ensure_future(ready_when_synced()))

    async def _set_ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_NAMES[1:]:
            await self.health.set(name, status)

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Graceful: not ready, refuse new streams, let in-flight ones finish within the grace period."""
        grace = self.config.server.grace_period_s
        await self._set_ready(False)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.director.close()
        for task in self._background:
            task.cancel()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.scraper is not None:
            await self.scraper.stop()  # type: ignore[attr-defined]
        if self._ops is not None:
            await self._ops.stop(0)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()


def run(config: Config, ready_file: str | None = None) -> int:
    """Run until SIGINT/SIGTERM. A port already in use is a one-line error, not a traceback."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass

    async def main() -> None:
        server = Server(config)
        ports = await server.start()
        if ready_file:
            import json
            from pathlib import Path

            Path(ready_file).write_text(json.dumps({"extproc": ports.extproc, "health": ports.health,
                                                    "metrics": ports.metrics}))  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.wait_stopped()
        log.info("epp: shutting down (grace %.1fs, %d streams in flight)", config.server.grace_period_s,
                 server.servicer.active_streams)  # fmt: skip
        await server.stop()

    try:
        asyncio.run(main())
    except ConfigError as err:  # settings only checkable at start-up (e.g. no Kubernetes namespace)
        print(f"epp: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as err:
        text = str(err)
        if "bind" in text.lower() or "address already in use" in text.lower() or "Failed to" in text:
            print(f"epp: cannot open a port ({text}); is another process using it? Use --*-port flags.",
                  file=sys.stderr)  # fmt: skip
            return 1
        raise
    return 0
