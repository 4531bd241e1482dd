"""The picker's process: explicit start-up, serve, drain and graceful shutdown.

Start-up builds the data layer (the endpoint pool), the scheduler and its plugins from the config and the
request director, then opens four ports: ext_proc (gRPC, TLS unless disabled; `server.host`), gRPC health
(plaintext, `server.host`: what kubelet probes), the admin API (gRPC, plaintext, `server.admin_host`,
127.0.0.1 by default) and Prometheus `/metrics` (HTTP, `server.metrics_host`, 127.0.0.1 by default). The
admin API and `/metrics` optionally require a bearer token (`server.admin_token_file`,
`server.metrics_token_file`).

Readiness (health names `readiness` and `envoy.service.ext_proc.v3.ExternalProcessor`) is SERVING when
all of: the pool is synced (static: at once after the first scrape; kubernetes: after the first full sync
of the InferencePool and a first try of the objective/rewrite collections), this replica holds the Lease
(with `leader_election.enabled`; `epp.ha.leader`), and it is not shutting down. Discovery and scraping run
on every replica, leader or not (a warm standby).

Shutdown (`shutdown()`, what SIGTERM/SIGINT run): readiness NOT_SERVING and the Lease released at once;
new ext_proc streams are still accepted for `server.drain_s` (the Service and the gateway need a moment
to stop sending; skipped when this replica was not ready within the last drain_s, e.g. a standby; a second
signal ends it early); then no new streams, and in-flight streams get `server.grace_period_s` to finish.
`stop()` is the same without the drain window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
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
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(slots=True)
class BoundPorts:
    extproc: int
    health: int
    metrics: int
    admin: int = 0


def read_token(path: Path | None, key: str) -> str | None:
    """The bearer token in `path` (whitespace stripped); ConfigError if unreadable or empty."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror}") from None
    if not token:
        raise ConfigError(f"{key}: {path} is empty")
    return token


def bearer_ok(header: str | None, token: str) -> bool:
    """`authorization: Bearer <token>`, compared in constant time."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every admin RPC needs `authorization: Bearer <token>` metadata, else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin API: missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        header = metadata.get("authorization")
        if bearer_ok(header if isinstance(header, str) else None, self._token):
            return await continuation(handler_call_details)
        return self._deny


def required_permissions(config: Config) -> frozenset[tuple[str, str, str, str | None]]:
    """(API group, resource, verb, resource name or None) of every Kubernetes API call this config makes;
    deploy/'s Role must grant exactly these (tests/deploy)."""
    from epp.datalayer.discovery import kubernetes, objectives
    from epp.ha import leader

    out: set[tuple[str, str, str, str | None]] = set()
    if config.pool.discovery == "kubernetes":
        out |= {(g, r, v, None) for g, r, v in kubernetes.PERMISSIONS}
        out |= {(g, r, v, None) for g, r, v in objectives.permissions(config.pool.kubernetes.objective_apis)}
    if config.leader_election.enabled:
        out |= leader.permissions(config.leader_election.lease_name)
    return frozenset(out)


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
        self.scraper: Any = None
        self.kube: Any = None  # KubeClient, with Kubernetes discovery or leader election
        self.discovery: Any = None
        self.objectives: Any = None
        self.elector: Any = None
        self._grpc: grpc.aio.Server | None = None
        self._ops: grpc.aio.Server | None = None
        self._admin: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._metrics_token: str | None = None
        self._stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        self.draining = asyncio.Event()  # shutdown began: readiness off, Lease released, still accepting
        self.accepting_stopped = asyncio.Event()  # no new ext_proc streams from here on
        self._background: list[asyncio.Future[None]] = []
        self.ports: BoundPorts | None = None
        self._synced = False
        self._leader = not config.leader_election.enabled
        self._stopping = False
        self.ready = False
        self._ready_until = -float("inf")  # loop time readiness last went from SERVING to NOT_SERVING

    def _plugin_gauges(self) -> dict[str, float]:
        """Pool-level gauges the plugins keep (e.g. the prefix index's size), computed at scrape time."""
        out: dict[str, float] = {}
        for plugin in self.scheduler.hooks(EndpointDetails):
            out.update(plugin.gauges())
        return out

    # -- start-up -------------------------------------------------------------------------------------

    async def start(self) -> BoundPorts:
        cfg = self.config.server
        admin_token = read_token(cfg.admin_token_file, "server.admin_token_file")
        self._metrics_token = read_token(cfg.metrics_token_file, "server.metrics_token_file")
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
        health_port = self._ops.add_insecure_port(f"{cfg.host}:{cfg.health_port}")

        from epp.admin.service import register_admin

        interceptors = [_TokenInterceptor(admin_token)] if admin_token else []
        self._admin = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        register_admin(self._admin, self)
        admin_port = self._admin.add_insecure_port(f"{cfg.admin_host}:{cfg.admin_port}")

        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, cfg.metrics_host, cfg.metrics_port, reuse_port=False)
        await site.start()
        metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        await self._grpc.start()
        await self._ops.start()
        await self._admin.start()
        await self.health.set("liveness", SERVING)
        await self._publish_ready()
        await self._start_scraper()
        if self.config.pool.discovery == "kubernetes" or self.config.leader_election.enabled:
            from epp.datalayer.discovery.kubeapi import KubeClient

            self.kube = KubeClient(self.config.pool.kubernetes)
        if self.config.leader_election.enabled:
            await self._start_election()
        if self.config.pool.discovery == "kubernetes":
            await self._start_discovery()
        else:
            await self._set_synced(self.pool.synced)
        self.ports = BoundPorts(extproc_port, health_port, metrics_port, admin_port)
        log.info(
            "epp serving: ext_proc %s:%d (%s), health :%d, admin %s:%d%s, metrics %s:%d%s, %d endpoints",
            cfg.host, extproc_port, "TLS" if cfg.tls.enabled else "plaintext", health_port, cfg.admin_host,
            admin_port, " (token)" if admin_token else "", cfg.metrics_host, metrics_port,
            " (token)" if self._metrics_token else "", len(self.pool),
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
        """Follow the InferencePool and the objective/rewrite objects; synced after the first sync of both."""
        from epp.datalayer.discovery.kubernetes import InferencePoolDiscovery
        from epp.datalayer.discovery.objectives import ObjectiveWatch

        kube = self.config.pool.kubernetes
        self.discovery = InferencePoolDiscovery(self.pool, self.kube, kube.inference_pool)
        await self.discovery.start()
        self.objectives = ObjectiveWatch(self.kube, kube.inference_pool, kube.objective_apis,
                                         self.director.router.update)  # fmt: skip
        await self.objectives.start()

        async def synced_when_both() -> None:
            await self.discovery.synced.wait()
            await self.objectives.synced.wait()
            await self._set_synced(True)

        self._background.append(asyncio.ensure_future(synced_when_both()))

    async def _start_election(self) -> None:
        from epp.ha.leader import LeaderElector, lease_namespace

        election = self.config.leader_election
        namespace = lease_namespace(election, self.config.pool.kubernetes)
        self.elector = LeaderElector(self.kube, election, namespace, self._set_leader)
        await self.elector.start()

    # -- readiness ------------------------------------------------------------------------------------

    async def _set_synced(self, synced: bool) -> None:
        self._synced = synced
        await self._publish_ready()

    async def _set_leader(self, leader: bool) -> None:
        self._leader = leader
        await self._publish_ready()

    async def _set_ready(self, ready: bool) -> None:
        """Kept for callers that force readiness (tests): same as the pool (un)synced."""
        await self._set_synced(ready)

    async def _publish_ready(self) -> None:
        ready = self._synced and self._leader and not self._stopping
        if self.ready and not ready:
            self._ready_until = asyncio.get_running_loop().time()
        if ready != self.ready:
            log.info("readiness %s", "SERVING" if ready else "NOT_SERVING")
        self.ready = ready
        for name in HEALTH_NAMES[1:]:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        if self._metrics_token is not None and not bearer_ok(
            request.headers.get("Authorization"), self._metrics_token
        ):
            return web.Response(status=401, text="missing or wrong bearer token\n",
                                headers={"WWW-Authenticate": 'Bearer realm="epp metrics"'})  # fmt: skip
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # -- shutdown -------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: begin shutting down (`wait_stopped` returns). Any later call: end the drain now."""
        if self._stopped.is_set():
            self._drain_cut.set()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _stop_serving_new(self) -> None:
        """Readiness NOT_SERVING and the Lease released (the standby takes over), at once."""
        self._stopping = True
        await self._publish_ready()
        if self.elector is not None:
            await self.elector.stop(release=True)

    async def shutdown(self) -> None:
        """SIGTERM: stop being ready, keep accepting for drain_s, then `stop()`."""
        was_ready = self.ready or (
            asyncio.get_running_loop().time() - self._ready_until < self.config.server.drain_s
        )
        await self._stop_serving_new()
        self.draining.set()
        drain = self.config.server.drain_s if was_ready else 0.0
        if drain > 0 and not self._drain_cut.is_set():
            log.info("draining: readiness NOT_SERVING, still accepting new streams for %gs (signal again "
                     "to skip), %d in flight", drain, self.servicer.active_streams)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_cut.wait(), drain)
        await self.stop()

    async def stop(self) -> None:
        """Graceful: not ready, refuse new streams, let in-flight ones finish within the grace period."""
        grace = self.config.server.grace_period_s
        await self._stop_serving_new()
        self.draining.set()
        if self._grpc is not None:
            stopping = asyncio.ensure_future(self._grpc.stop(grace))
            await asyncio.sleep(0)  # grpc.aio refuses new RPCs as soon as stop() has begun
            self.accepting_stopped.set()
            await self.director.close()  # requests held by flow control: 503 now, not cut when grace ends
            if self.servicer.active_streams:
                log.info("no new streams; %d in flight get up to %gs", self.servicer.active_streams, grace)
            await stopping
        self.accepting_stopped.set()
        await self.director.close()
        await self.director.close_plugins()
        for task in self._background:
            task.cancel()
        for component in (self.objectives, self.discovery):
            if component is not None:
                await component.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        if self.kube is not None:
            await self.kube.close()
        for ops in (self._admin, self._ops):
            if ops is not None:
                await ops.stop(0)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()


def run(config: Config, ready_file: str | None = None) -> int:
    """Run until SIGINT/SIGTERM, then drain and stop. A port already in use is a one-line error."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass

    async def main() -> None:
        server = Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        ports = await server.start()
        if ready_file:
            import json

            bound = {"extproc": ports.extproc, "health": ports.health, "metrics": ports.metrics,
                     "admin": ports.admin}  # fmt: skip
            Path(ready_file).write_text(json.dumps(bound))
        await server.wait_stopped()
        log.info("epp: shutting down (drain %gs, grace %gs, %d streams in flight)", config.server.drain_s,
                 config.server.grace_period_s, server.servicer.active_streams)  # fmt: skip
        await server.shutdown()

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
