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

How (the list-then-watch pattern of Kubernetes clients, over plain aiohttp):

1. LIST the pool (by `fieldSelector=metadata.name=…`, which yields a fresh collection resourceVersion to
   watch from; a GET would give the object's own, possibly long-expired, one), then LIST its pods by
   `labelSelector`, and `pool.replace(...)` the endpoints. `synced` is set after the first such sync.
2. WATCH both from the lists' resourceVersions (`watch=1&allowWatchBookmarks=true&timeoutSeconds=…`, JSON
   lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": …}`). Every pod event that changes the
   endpoint set calls `pool.replace` (which keeps the metrics and in-flight counts of known endpoints). A
   watch the server ends normally resumes from the last resourceVersion seen (bookmarks keep it fresh).
3. Back to 1 when the pool's selector or ports change, on 410 Gone (our resourceVersion was compacted
   away), and after any error: lost connection, 401/403, pool missing, invalid pool spec. Errors wait a
   capped exponential back-off (0.5 s doubling to 30 s, reset after 60 s without errors), are logged once
   per kind until the next successful sync (which logs the recovery), and never stop the picker: the last
   known endpoints stay in service meanwhile. A deleted (or not found) pool empties the endpoint set.

Auth: bearer token from `token_file`, re-read every minute because projected service-account tokens rotate
(and at once after a 401); without a token file requests go unauthenticated (e.g. through `kubectl proxy`).
TLS is verified against `ca_file` (the system trust store if it is null). `api_server` defaults to
`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.

RBAC the picker's ServiceAccount needs, in the pool's namespace (a Role + RoleBinding, see deploy/):

    - apiGroups: [""]                             resources: [pods]            verbs: [get, list, watch]
    - apiGroups: [inference.networking.k8s.io]    resources: [inferencepools]  verbs: [get, list, watch]

Pods are listed in one page (no `limit`/`continue`): pools are tens to hundreds of pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp.config import ENGINES, ConfigError, KubernetesConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool

log = logging.getLogger(__name__)

POOL_GROUP_VERSION = "inference.networking.k8s.io/v1"
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE = "vllm"

REQUEST_TIMEOUT_S = 30.0  # a LIST or GET
WATCH_TIMEOUT_S = 300.0  # asked of the server (timeoutSeconds); it then ends the watch and we resume
TOKEN_REFRESH_S = 60.0  # client-go re-reads projected tokens every minute too
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 60.0  # this long without an error and the back-off starts again from the base
MAX_EVENT_BYTES = 16 << 20  # one watch event (a pod with big annotations is ~50 KB)

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The two fields of an InferencePool that decide its endpoints."""

    match_labels: tuple[tuple[str, str], ...]
    target_ports: tuple[int, ...]

    @property
    def label_selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.match_labels)


class _Problem(Exception):
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


def _status_message(body: bytes) -> str:
    """The `message` of a Kubernetes Status body, or the body itself."""
    try:
        status = json.loads(body)
        return str(status.get("message") or status)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:300]


class InferencePoolDiscovery:
    """Keeps `pool` equal to the endpoints of one InferencePool. `start()` returns at once; `synced` is
    set after the first full sync (readiness waits for it)."""

    def __init__(
        self,
        pool: EndpointPool,
        config: KubernetesConfig,
        *,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        backoff_reset_s: float = BACKOFF_RESET_S,
        token_refresh_s: float = TOKEN_REFRESH_S,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self._config = config
        self._backoff = (backoff_base_s, backoff_max_s, backoff_reset_s)
        self._token_refresh_s = token_refresh_s
        self._watch_timeout_s = watch_timeout_s
        self.synced = asyncio.Event()
        self.namespace = ""
        self.api_server = ""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._token: str | None = None
        self._token_read_at = -float("inf")
        self._spec: PoolSpec | None = None
        # Per pod of the selector: (podIP, engine) if it is an endpoint, else None. Not the whole object: pods
        # carry tens of KB of managedFields we never read.
        self._pods: dict[str, tuple[str, str] | None] = {}
        self._published: list[tuple[str, str]] | None = None
        self._problems_logged: set[str] = set()
        self._warned_engines: set[str] = set()
        self._warned_no_token = False

    @property
    def _pool_name(self) -> str:
        return f"{self.namespace}/{self._config.inference_pool}"

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve where the API server and the pool are, then follow the pool in the background.

        Raises ConfigError only for settings that cannot fix themselves (no API server address, no
        namespace, unreadable CA file); everything that goes wrong later is logged and retried."""
        cfg = self._config
        self.namespace = cfg.namespace or self._read_namespace_file()
        self.api_server = (cfg.api_server or self._in_cluster_api_server()).rstrip("/")
        ssl_context: ssl.SSLContext | bool = True
        if self.api_server.startswith("https://"):
            try:
                ssl_context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            except OSError as err:
                raise ConfigError(f"pool.kubernetes.ca_file: cannot read {cfg.ca_file}: {err}") from None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            headers={"Accept": "application/json", "User-Agent": "epp"},
        )
        self._task = asyncio.create_task(self._run(), name="inferencepool-discovery")
        log.info("following InferencePool %s via %s", self._pool_name, self.api_server)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _read_namespace_file(self) -> str:
        path = self._config.namespace_file
        try:
            namespace = path.read_text().strip()
        except OSError:
            namespace = ""
        if not namespace:
            raise ConfigError(
                f"pool.kubernetes.namespace is not set and {path} is missing or empty "
                "(not running in a pod?): set the InferencePool's namespace"
            )
        return namespace

    @staticmethod
    def _in_cluster_api_server() -> str:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError(
                "pool.kubernetes.api_server is not set and KUBERNETES_SERVICE_HOST is not in the "
                "environment (not running in a pod?): set api_server, e.g. http://127.0.0.1:8001 "
                "behind `kubectl proxy`"
            )
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    # -- the loop: sync, follow, recover --------------------------------------------------------------

    async def _run(self) -> None:
        base, cap, reset_after = self._backoff
        failures = 0
        last_error_at = time.monotonic()
        while True:
            sync_started = time.monotonic()
            try:
                pool_rv, pods_rv = await self._sync()
                await self._follow(pool_rv, pods_rv)
            except _Resync as why:
                log.info("InferencePool %s: listing again (%s)", self._pool_name, why)
                if time.monotonic() - sync_started < base:  # never relist in a tight loop
                    await asyncio.sleep(base)
                continue
            except _Problem as problem:
                self._report(problem)
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                self._report(
                    _Problem(
                        "connection",
                        f"lost the API server at {self.api_server} ({type(err).__name__}: {err}); "
                        "keeping the last known endpoints",
                        logging.WARNING,
                    )
                )
            except Exception as err:  # a bug or a malformed object: log it (once), keep the picker running
                if "unexpected" not in self._problems_logged:
                    self._problems_logged.add("unexpected")
                    log.exception("InferencePool %s: unexpected error, retrying: %s", self._pool_name, err)
            now = time.monotonic()
            if now - last_error_at >= reset_after:
                failures = 0
            last_error_at = now
            delay = min(cap, base * 2**failures)
            failures += 1
            await asyncio.sleep(delay)

    def _report(self, problem: _Problem) -> None:
        if problem.kind in self._problems_logged:
            log.debug("InferencePool %s: %s", self._pool_name, problem.message)
            return
        self._problems_logged.add(problem.kind)
        log.log(
            problem.level, "InferencePool %s: %s (retrying with back-off)", self._pool_name, problem.message
        )

    async def _sync(self) -> tuple[str, str]:
        """LIST the pool and its pods, publish the endpoints. Returns both lists' resourceVersions."""
        pools = await self._get(
            self._pools_path, {"fieldSelector": f"metadata.name={self._config.inference_pool}"}
        )
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
            raise _Problem("pool_not_found", "not found (no endpoints until it exists)")
        try:
            spec = parse_pool_spec(items[0])
        except ValueError as err:
            raise _Problem("invalid_pool", f"invalid spec: {err}") from None
        pods = await self._get(self._pods_path, {"labelSelector": spec.label_selector})
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
        watches = [
            asyncio.ensure_future(
                self._watch(self._pods_path, {"labelSelector": spec.label_selector}, pods_rv, self._on_pod)
            ),
            asyncio.ensure_future(
                self._watch(
                    self._pools_path,
                    {"fieldSelector": f"metadata.name={self._config.inference_pool}"},
                    pool_rv,
                    self._on_pool,
                )
            ),
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

    # -- HTTP -----------------------------------------------------------------------------------------

    @property
    def _pods_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods"

    @property
    def _pools_path(self) -> str:
        return f"/apis/{POOL_GROUP_VERSION}/namespaces/{self.namespace}/inferencepools"

    def _auth(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._token_read_at >= self._token_refresh_s:
            self._token_read_at = now
            try:
                self._token = self._config.token_file.read_text().strip() or None
            except OSError as err:
                self._token = None
                if not self._warned_no_token:
                    self._warned_no_token = True
                    log.warning("cannot read %s (%s): calling the API server without a token",
                                self._config.token_file, err.strerror)  # fmt: skip
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _http_problem(self, status: int, body: bytes, path: str, verb: str) -> _Problem:
        message = _status_message(body)
        resource = "pods" if path == self._pods_path else "inferencepools"
        if status == 401:
            self._token_read_at = -float("inf")  # the token may have rotated: read it again next time
            return _Problem(
                "unauthorized",
                f"401 Unauthorized: the API server rejected the token from {self._config.token_file} "
                f"({message})",
            )
        if status == 403:
            return _Problem(
                f"forbidden:{resource}:{verb}",
                f"403 Forbidden to {verb} {resource} in namespace {self.namespace}: {message}. The picker's "
                "ServiceAccount needs get/list/watch on pods and inferencepools (Role in deploy/epp.yaml)",
            )
        if status == 404 and resource == "inferencepools":
            return _Problem(
                "no_inferencepool_api",
                f"404 listing inferencepools ({message}): is the InferencePool CRD "
                f"({POOL_GROUP_VERSION}) installed?",
            )
        return _Problem(f"http_{status}", f"{verb} {path} answered {status}: {message}")

    async def _get(self, path: str, params: dict[str, str]) -> Json:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with self._session.get(
            self.api_server + path, params=params, headers=self._auth(), timeout=timeout
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise self._http_problem(resp.status, body, path, "list")
        try:
            data = json.loads(body)
            str(data["metadata"]["resourceVersion"])  # every list has one
        except (ValueError, KeyError, TypeError):
            raise _Problem("bad_response", f"list {path}: not a Kubernetes list: {body[:200]!r}") from None
        return dict(data)

    async def _watch(
        self, path: str, params: dict[str, str], rv: str, on_event: Callable[[str, Json], None]
    ) -> None:
        """Watch from `rv` forever, resuming after the server's normal end of a watch. Raises `_Resync`
        on 410 Gone (or when `on_event` asks), `_Problem` / aiohttp errors on failures."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT_S,
                                        sock_read=self._watch_timeout_s + REQUEST_TIMEOUT_S)  # fmt: skip
        while True:
            query = dict(params, watch="1", resourceVersion=rv, allowWatchBookmarks="true",
                         timeoutSeconds=str(max(1, int(self._watch_timeout_s))))  # fmt: skip
            started, events = time.monotonic(), 0
            async with self._session.get(
                self.api_server + path, params=query, headers=self._auth(), timeout=timeout
            ) as resp:
                if resp.status == 410:
                    raise _Resync(f"resourceVersion {rv} of {path} expired (410 Gone)")
                if resp.status != 200:
                    raise self._http_problem(resp.status, await resp.read(), path, "watch")
                async for line in _json_lines(resp):
                    try:
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                    except (ValueError, AttributeError):
                        raise _Problem(
                            "bad_response", f"watch {path}: not a watch event: {line[:200]!r}"
                        ) from None
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise _Resync(f"resourceVersion {rv} of {path} expired ({obj.get('message')})")
                        raise _Problem(
                            f"watch_error_{obj.get('code')}", f"watch {path}: {obj.get('message')}"
                        )
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    events += 1
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, obj)
            # The server ended the watch (timeoutSeconds): resume, unless it keeps ending them at once.
            if events == 0 and time.monotonic() - started < 1.0:
                await asyncio.sleep(self._backoff[0])


async def _json_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Split a watch stream into lines without aiohttp's readline size limit (pods can be large)."""
    buffer = bytearray()
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield line
        if len(buffer) > MAX_EVENT_BYTES:
            raise _Problem("bad_response", f"a watch event is larger than {MAX_EVENT_BYTES} bytes")
    if buffer.strip():
        yield bytes(buffer)


__all__ = ["InferencePoolDiscovery", "PoolSpec", "endpoint_address", "parse_pool_spec", "pod_is_endpoint"]
