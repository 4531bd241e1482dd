"""Follow an InferencePool in Kubernetes and keep the `EndpointPool` equal to its Ready pods × target ports.

What is followed (`pool.discovery: kubernetes`, settings in `KubernetesConfig`):

- The InferencePool (`inference.networking.k8s.io/v1`) named `inference_pool` in `namespace` (default: the
  service account's namespace file). Its `spec.selector.matchLabels` chooses the pods and each of its
  `spec.targetPorts[].number` makes one endpoint per pod. Only those two fields matter: status updates
  written by gateway controllers are ignored.
- The pods matching the selector. An endpoint is `podIP:port` of a pod that is Ready (condition
  `Ready=True`), has a `status.podIP` and no `metadata.deletionTimestamp` (terminating pods stop getting new
  requests at once). Its engine is the pod label `inference.networking.k8s.io/engine-type` (default `vllm`;
  an unknown value is logged once and treated as `vllm`).

How (the list-then-watch pattern of Kubernetes clients, over `kubeapi.KubeClient`):

1. LIST the pool (by `fieldSelector=metadata.name=…`, which yields a fresh collection resourceVersion to
   watch from; a GET would give the object's own, possibly long-expired, one), then LIST its pods by
   `labelSelector`, and `pool.replace(...)` the endpoints. `synced` is set after the first such sync.
2. WATCH both from the lists' resourceVersions (`KubeClient.follow`: bounded, jittered watch timeouts,
   stall detection, TCP keep-alive). Every pod event that changes the endpoint set calls `pool.replace`
   (which keeps the metrics and in-flight counts of known endpoints).
3. Back to 1 when the pool's selector or ports change, on 410 Gone (our resourceVersion was compacted
   away), and after any error: lost connection, 401/403, 429, pool missing, invalid pool spec. Errors wait
   the `kubeapi.Backoff` delay (0.5 s doubling to 30 s, reset after 60 s without errors; a 429's
   Retry-After wins), are logged once per kind until the next successful sync (which logs the recovery),
   and never stop the picker: the last known endpoints stay in service meanwhile. A deleted (or not
   found) pool empties the endpoint set.

RBAC the picker's ServiceAccount needs, in the pool's namespace (`PERMISSIONS`; deploy/base/rbac.yaml):

    - apiGroups: [""]                             resources: [pods]            verbs: [list, watch]
    - apiGroups: [inference.networking.k8s.io]    resources: [inferencepools]  verbs: [list, watch]

Pods are listed in one page (no `limit`/`continue`): pools are tens to hundreds of pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.config import ENGINES
from epp.datalayer.discovery.kubeapi import ApiError, Backoff, Gone, KubeClient
from epp.datalayer.endpoints import Endpoint, EndpointPool

log = logging.getLogger(__name__)

POOL_GROUP_VERSION = "inference.networking.k8s.io/v1"
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE = "vllm"
RBAC_HINT = "deploy/base/rbac.yaml"

# (API group, resource, verb): every call this module makes (tests/deploy checks the Role against it).
PERMISSIONS = frozenset(
    {("", "pods", "list"), ("", "pods", "watch"),
     ("inference.networking.k8s.io", "inferencepools", "list"),
     ("inference.networking.k8s.io", "inferencepools", "watch")}
)  # fmt: skip

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The two fields of an InferencePool that decide its endpoints."""

    match_labels: tuple[tuple[str, str], ...]
    target_ports: tuple[int, ...]

    @property
    def label_selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.match_labels)


class Problem(Exception):
    """A failed sync: `kind` groups repeats for logging (one log line per kind until recovery)."""

    def __init__(self, kind: str, message: str, level: int = logging.ERROR) -> None:
        super().__init__(message)
        self.kind, self.message, self.level = kind, message, level


class _Resync(Exception):
    """Not an error: the pool's spec changed or a resourceVersion expired; list again at once."""


def parse_pool_spec(pool: Json) -> PoolSpec:
    """Validate the fields we use. Raises ValueError naming the bad field."""
    spec = pool.get("spec") or {}
    match_labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if not isinstance(match_labels, Mapping) or not match_labels:
        # An empty selector would select every pod of the namespace: refuse rather than guess.
        raise ValueError("spec.selector.matchLabels is empty")
    ports: list[int] = []
    for i, item in enumerate(spec.get("targetPorts") or []):
        number = item.get("number") if isinstance(item, Mapping) else None
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ValueError(f"spec.targetPorts[{i}].number is not a port: {number!r}")
        if number not in ports:
            ports.append(number)
    if not ports:
        raise ValueError("spec.targetPorts is empty")
    labels = tuple(sorted((str(k), str(v)) for k, v in match_labels.items()))
    return PoolSpec(labels, tuple(ports))


def pod_is_endpoint(pod: Json) -> bool:
    """Ready, has an IP, not terminating."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def endpoint_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def api_problem(err: ApiError, client: KubeClient, what: str, needs: str) -> Problem:
    """A readable, groupable problem for a failed call on `what` (a resource name, e.g. "pods")."""
    where = f"in namespace {client.namespace}"
    if err.status == 0:
        return Problem(
            "connection",
            f"lost the API server at {client.api_server} ({err.reason}: {err.message}); keeping the last "
            "known state",
            logging.WARNING,
        )
    if err.status == 401:
        return Problem(
            "unauthorized",
            f"401 Unauthorized: the API server rejected the token from {client.config.token_file} "
            f"({err.message})",
        )
    if err.status == 403:
        return Problem(
            f"forbidden:{what}:{err.verb}",
            f"403 Forbidden to {err.verb} {what} {where}: {err.message}. The picker's ServiceAccount needs "
            f"{needs} (the Role in {RBAC_HINT})",
        )
    if err.status == 429:
        after = "with back-off"
        if err.retry_after is not None:
            after = f"after {err.retry_after:g} s (Retry-After)"
        message = f"429 Too Many Requests for {err.verb} {what}: retrying {after}"
        return Problem("throttled", message, logging.WARNING)
    return Problem(f"http_{err.status}", f"{err.verb} {err.path} answered {err.status}: {err.message}")


class InferencePoolDiscovery:
    """Keeps `pool` equal to the endpoints of the InferencePool `inference_pool` in the client's namespace.
    `start()` returns at once; `synced` is set after the first full sync (readiness waits for it)."""

    def __init__(
        self, pool: EndpointPool, client: KubeClient, inference_pool: str, *, backoff: Backoff | None = None
    ) -> None:
        self._pool = pool
        self._client = client
        self._name = inference_pool
        self._backoff = backoff or Backoff()
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._spec: PoolSpec | None = None
        # Per pod of the selector: (podIP, engine) if it is an endpoint, else None. Not the whole object: pods
        # carry tens of KB of managedFields we never read.
        self._pods: dict[str, tuple[str, str] | None] = {}
        self._published: list[tuple[str, str]] | None = None
        self._problems_logged: set[str] = set()
        self._warned_engines: set[str] = set()

    @property
    def _pool_name(self) -> str:
        return f"{self._client.namespace}/{self._name}"

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client (ConfigError for settings that cannot fix themselves), then follow the pool in
        the background; everything that goes wrong later is logged and retried."""
        await self._client.open()
        self._task = asyncio.create_task(self._run(), name="inferencepool-discovery")
        log.info("following InferencePool %s via %s", self._pool_name, self._client.api_server)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the loop: sync, follow, recover --------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sync_started = loop.time()
            try:
                pool_rv, pods_rv = await self._sync()
                await self._follow(pool_rv, pods_rv)
            except (_Resync, Gone) as why:
                reason = f"resourceVersion expired, 410 Gone: {why.path}" if isinstance(why, Gone) else why
                log.info("InferencePool %s: listing again (%s)", self._pool_name, reason)
                if loop.time() - sync_started < self._backoff.base_s:  # never relist in a tight loop
                    await asyncio.sleep(self._backoff.base_s)
                continue
            except Problem as problem:
                self._report(problem)
                error: BaseException = problem
            except ApiError as err:
                self._report(self._problem(err))
                error = err
            except Exception as err:  # a bug or a malformed object: log it (once), keep the picker running
                if "unexpected" not in self._problems_logged:
                    self._problems_logged.add("unexpected")
                    log.exception("InferencePool %s: unexpected error, retrying: %s", self._pool_name, err)
                error = err
            await asyncio.sleep(self._backoff.next_delay(error))

    def _problem(self, err: ApiError) -> Problem:
        what = "inferencepools" if "/inferencepools" in err.path else "pods"
        if err.status == 404 and what == "inferencepools":
            return Problem(
                "no_inferencepool_api",
                f"404 listing inferencepools ({err.message}): is the InferencePool CRD "
                f"({POOL_GROUP_VERSION}) installed?",
            )
        return api_problem(err, self._client, what, "list/watch on pods and inferencepools")

    def _report(self, problem: Problem) -> None:
        if problem.kind in self._problems_logged:
            log.debug("InferencePool %s: %s", self._pool_name, problem.message)
            return
        self._problems_logged.add(problem.kind)
        suffix = "" if problem.kind == "throttled" else " (retrying with back-off)"
        log.log(problem.level, "InferencePool %s: %s%s", self._pool_name, problem.message, suffix)

    async def _sync(self) -> tuple[str, str]:
        """LIST the pool and its pods, publish the endpoints. Returns both lists' resourceVersions."""
        pools = await self._client.list(self._pools_path, {"fieldSelector": f"metadata.name={self._name}"})
        items = pools.get("items") or []
        if not items:
            self._spec = None
            self._pods = {}
            if self._published:
                log.warning(
                    "InferencePool %s is gone: removing its %d endpoints",
                    self._pool_name,
                    len(self._published),
                )
                self._publish()
            raise Problem("pool_not_found", "not found (no endpoints until it exists)")
        try:
            spec = parse_pool_spec(items[0])
        except ValueError as err:
            raise Problem("invalid_pool", f"invalid spec: {err}") from None
        pods = await self._client.list(self._pods_path, {"labelSelector": spec.label_selector})
        self._spec = spec
        self._pods = {p["metadata"]["name"]: self._pod_view(p) for p in pods.get("items") or []}
        if self._problems_logged:
            log.info(
                "InferencePool %s: recovered after: %s",
                self._pool_name,
                ", ".join(sorted(self._problems_logged)),
            )
            self._problems_logged.clear()
        self._publish()
        log.info(
            "InferencePool %s synced: selector %s, ports %s, %d pods, %d endpoints",
            self._pool_name, spec.label_selector, list(spec.target_ports), len(self._pods),
            len(self._published or ()),
        )  # fmt: skip
        self.synced.set()
        return str(pools["metadata"]["resourceVersion"]), str(pods["metadata"]["resourceVersion"])

    async def _follow(self, pool_rv: str, pods_rv: str) -> None:
        """Watch the pool and its pods until one of the watches needs a relist (raises)."""
        assert self._spec is not None
        spec = self._spec
        by_label = {"labelSelector": spec.label_selector}
        by_name = {"fieldSelector": f"metadata.name={self._name}"}
        watches = [
            asyncio.ensure_future(self._client.follow(self._pods_path, by_label, pods_rv, self._on_pod)),
            asyncio.ensure_future(self._client.follow(self._pools_path, by_name, pool_rv, self._on_pool)),
        ]
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
            done.pop().result()
        finally:
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)

    def _on_pod(self, kind: str, pod: Json) -> None:
        name = pod["metadata"]["name"]
        if kind == "DELETED":
            self._pods.pop(name, None)
        else:
            self._pods[name] = self._pod_view(pod)
        self._publish()

    def _on_pool(self, kind: str, pool: Json) -> None:
        if kind == "DELETED":
            raise _Resync("the pool was deleted")
        try:
            spec = parse_pool_spec(pool)
        except ValueError:
            spec = None
        if spec != self._spec:
            raise _Resync("the pool's selector or target ports changed")

    # -- endpoints ------------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Replace the pool's endpoints if they differ from what was last published."""
        wanted = self._endpoints()
        if wanted == self._published:
            return
        before = {address for address, _ in self._published or ()}
        after = {address for address, _ in wanted}
        if self._published is not None:
            log.info(
                "InferencePool %s: endpoints +%d -%d, now %d",
                self._pool_name, len(after - before), len(before - after), len(after),
            )  # fmt: skip
        self._published = wanted
        self._pool.replace(Endpoint(address, engine) for address, engine in wanted)

    def _endpoints(self) -> list[tuple[str, str]]:
        if self._spec is None:
            return []
        out: list[tuple[str, str]] = []
        for name in sorted(self._pods):
            view = self._pods[name]
            if view is not None:
                ip, engine = view
                out.extend((endpoint_address(ip, port), engine) for port in self._spec.target_ports)
        return out

    def _pod_view(self, pod: Json) -> tuple[str, str] | None:
        return (str(pod["status"]["podIP"]), self._engine(pod)) if pod_is_endpoint(pod) else None

    def _engine(self, pod: Json) -> str:
        engine = ((pod.get("metadata") or {}).get("labels") or {}).get(ENGINE_LABEL, DEFAULT_ENGINE)
        if engine in ENGINES:
            return str(engine)
        if engine not in self._warned_engines:
            self._warned_engines.add(engine)
            log.warning(
                "pod label %s=%r is not a known engine (%s): treating those pods as %s",
                ENGINE_LABEL, engine, ", ".join(ENGINES), DEFAULT_ENGINE,
            )  # fmt: skip
        return DEFAULT_ENGINE

    # -- paths ----------------------------------------------------------------------------------------

    @property
    def _pods_path(self) -> str:
        return f"/api/v1/namespaces/{self._client.namespace}/pods"

    @property
    def _pools_path(self) -> str:
        return f"/apis/{POOL_GROUP_VERSION}/namespaces/{self._client.namespace}/inferencepools"


__all__ = [
    "PERMISSIONS",
    "InferencePoolDiscovery",
    "PoolSpec",
    "endpoint_address",
    "parse_pool_spec",
    "pod_is_endpoint",
]
