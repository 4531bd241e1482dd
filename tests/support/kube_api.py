"""A stand-in Kubernetes API server for tests: a real HTTP server (aiohttp, 127.0.0.1, optionally TLS) that
implements the subset of the API the picker uses, with the real list/watch/write semantics.

No real API server can run on the test machines, so this one follows the Kubernetes API conventions
closely enough to exercise a client honestly:

- One cluster-wide, increasing resourceVersion (like etcd's revision), stamped on every object written and
  returned as the list's `metadata.resourceVersion`.
- Served kinds: Pods (`/api/v1`), InferencePools (`inference.networking.k8s.io/v1`), Leases
  (`coordination.k8s.io/v1`), and InferenceObjectives / InferenceModelRewrites under
  `inference.networking.x-k8s.io/v1alpha2` and `llm-d.ai/v1alpha2`. `uninstall(key)` / `install(key)`
  remove and restore a kind as a CRD deletion would: its paths answer 404 (a Status, "the server could not
  find the requested resource") and its open watches end.
- Verbs: GET one, LIST, WATCH (`?watch=1|true`), CREATE (POST; 409 AlreadyExists) and UPDATE (PUT; 409
  Conflict when `metadata.resourceVersion` is not the stored one; a body without one is refused with 409
  too, unlike a real server's unconditional update, because the picker never sends one). Filters:
  `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = AND) and `fieldSelector` (`metadata.name`,
  `metadata.namespace`, `=`/`==`/`!=`).
- WATCH from `resourceVersion=R` replays the retained history after R, then streams live events as the
  test mutates objects; without R (or with "0") it starts with a synthetic ADDED for every current object.
  As in Kubernetes, a MODIFIED object that leaves a watch's selector arrives there as DELETED, one that
  enters it as ADDED. `allowWatchBookmarks=true` adds a BOOKMARK every `bookmark_interval_s`;
  `timeoutSeconds` ends the watch normally.
- `compact()` forgets history. A watch from a resourceVersion older than the compaction gets an ERROR event
  with a 410 Status ("too old resource version"), the usual server behaviour; with `gone_as_http=True` the
  request itself answers HTTP 410 instead, as some servers/proxies do.
- Bearer-token check (401 Status), per-resource-and-verb denial (`forbid`, 403 Status worded like RBAC's),
  Status bodies for 404/409/410/401/403/429.
- Faults: `stall_watches()` silences every open watch without closing it (no FIN, timeoutSeconds
  ignored: a half-open connection or a stuck proxy); `split_events = n` writes each watch event in pieces
  of n bytes, flushed one by one; `throttle(count, retry_after)` answers the next `count` requests 429 with
  `Retry-After`.
- Test controls: `close_watches(abort=...)` ends every open watch cleanly or cuts its connection,
  optionally dropping events still queued for it; `requests` records each request as (verb, resource key,
  query); `wait_requests` awaits a condition on it without sleeping; `wait_objects` likewise on the stored
  objects.

Not implemented: pagination (`limit`/`continue`), `resourceVersionMatch`, set-based label selectors, PATCH,
DELETE over HTTP (tests delete through methods), admission, defaulting, finalizers/graceful deletion.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Json = dict[str, Any]
POOL_API = "inference.networking.k8s.io/v1"
LEASE_API = "coordination.k8s.io/v1"
GIE_ALPHA = "inference.networking.x-k8s.io/v1alpha2"
LLMD_ALPHA = "llm-d.ai/v1alpha2"
PODS, POOLS, LEASES = "pods", "inferencepools", "leases"


def objectives_key(api: str = GIE_ALPHA) -> str:
    return f"inferenceobjectives.{api.partition('/')[0]}"


def rewrites_key(api: str = GIE_ALPHA) -> str:
    return f"inferencemodelrewrites.{api.partition('/')[0]}"


@dataclass(frozen=True)
class Kind:
    api: str  # group/version ("v1" for the core group)
    resource: str
    kind: str
    key: str  # what tests name it by: "pods", "inferencepools", "leases", "inferenceobjectives.llm-d.ai"

    @property
    def group(self) -> str:
        return "" if "/" not in self.api else self.api.split("/")[0]


KINDS = [
    Kind("v1", PODS, "Pod", PODS),
    Kind(POOL_API, POOLS, "InferencePool", POOLS),
    Kind(LEASE_API, LEASES, "Lease", LEASES),
]
for _api in (GIE_ALPHA, LLMD_ALPHA):
    KINDS.append(Kind(_api, "inferenceobjectives", "InferenceObjective", objectives_key(_api)))
    KINDS.append(Kind(_api, "inferencemodelrewrites", "InferenceModelRewrite", rewrites_key(_api)))


def make_pod(
    name: str,
    ip: str | None,
    labels: dict[str, str],
    ready: bool = True,
    deleting: bool = False,
    namespace: str = "default",
) -> Json:
    """A pod object shaped like the API's (only the fields a picker reads, plus a few realistic others)."""
    metadata: Json = {"name": name, "namespace": namespace, "labels": dict(labels), "uid": f"uid-{name}"}
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: Json = {
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": []},
        "status": status,
    }


def make_pool(name: str, match_labels: dict[str, str], ports: list[int], namespace: str = "default") -> Json:
    return {
        "apiVersion": POOL_API,
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": {
            "selector": {"matchLabels": dict(match_labels)},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


def make_objective(
    name: str, priority: int | None, pool: str = "llama", api: str = GIE_ALPHA, created: str | None = None
) -> Json:
    spec: Json = {"poolRef": {"name": pool}}
    if priority is not None:
        spec["priority"] = priority
    metadata: Json = {"name": name, "namespace": "default"}
    if created:
        metadata["creationTimestamp"] = created
    return {"apiVersion": api, "kind": "InferenceObjective", "metadata": metadata, "spec": spec}


def make_rewrite(
    name: str,
    rules: list[tuple[list[str], list[tuple[str, int | None]]]],
    pool: str = "llama",
    api: str = GIE_ALPHA,
    created: str | None = None,
) -> Json:
    """`rules`: (model names matched, [] = every model; [(target model, weight or None)])."""
    spec_rules = []
    for matches, targets in rules:
        rule: Json = {"matches": [{"model": {"type": "Exact", "value": m}} for m in matches]}
        rule["targets"] = [
            {"modelRewrite": model} | ({"weight": weight} if weight is not None else {})
            for model, weight in targets
        ]
        spec_rules.append(rule)
    metadata: Json = {"name": name, "namespace": "default"}
    if created:
        metadata["creationTimestamp"] = created
    return {
        "apiVersion": api,
        "kind": "InferenceModelRewrite",
        "metadata": metadata,
        "spec": {"poolRef": {"name": pool}, "rules": spec_rules},
    }


def _requirements(selector: str, equality_only: bool = False) -> list[tuple[str, str, str]]:
    """Parse `k=v,k==v,k!=v,k,!k` into (op, key, value) with op in {"=", "!=", "exists", "!exists"}."""
    out: list[tuple[str, str, str]] = []
    for raw in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            out.append(("!=", key.strip(), value.strip()))
        elif "=" in raw:
            key, value = raw.replace("==", "=").split("=", 1)
            out.append(("=", key.strip(), value.strip()))
        elif equality_only or " " in raw or "(" in raw:
            raise ValueError(f"unsupported selector {raw!r} (set-based selectors are not in the stand-in)")
        elif raw.startswith("!"):
            out.append(("!exists", raw[1:].strip(), ""))
        else:
            out.append(("exists", raw, ""))
    return out


def _holds(op: str, have: str | None, value: str) -> bool:
    return {"=": have == value, "!=": have != value, "exists": have is not None, "!exists": have is None}[op]


def label_matcher(selector: str) -> Callable[[Json], bool]:
    """A label selector, as the API server applies it. Raises ValueError when malformed."""
    requirements = _requirements(selector)

    def matches(obj: Json) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(_holds(op, labels.get(key), value) for op, key, value in requirements)

    return matches


def field_matcher(selector: str) -> Callable[[Json], bool]:
    requirements = _requirements(selector, equality_only=True)
    for _, key, _ in requirements:
        if key not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f'field label not supported: "{key}"')

    def matches(obj: Json) -> bool:
        meta = obj["metadata"]
        return all(_holds(op, meta.get(key.split(".", 1)[1]), value) for op, key, value in requirements)

    return matches


@dataclass
class _Event:
    resource: str  # Kind.key
    rv: int
    old: Json | None  # before the change (None: created)
    new: Json  # after; for a deletion, the last state stamped with the deletion's resourceVersion
    deleted: bool = False


@dataclass
class _Watcher:
    resource: str
    namespace: str
    matches: Callable[[Json], bool]
    queue: asyncio.Queue[_Event | None] = field(default_factory=asyncio.Queue)
    request: web.Request | None = None
    stalled: bool = False


class KubeApi:
    """Holds the objects; the test mutates them with `put_pod` / `delete_pod` / `put` / … and every
    open watch hears about it. `url` is the base address to give the client as `api_server`."""

    def __init__(self, token: str | None = "test-token", bookmark_interval_s: float = 0.5) -> None:
        self.token = token
        self.bookmark_interval_s = bookmark_interval_s
        self.gone_as_http = False
        self.split_events: int | None = None
        self.rv = 100
        self.kinds = {k.key: k for k in KINDS}
        self.installed = set(self.kinds)
        self.objects: dict[str, dict[tuple[str, str], Json]] = {k.key: {} for k in KINDS}
        self.history: list[_Event] = []
        self.compacted_rv = 0  # watches from an older resourceVersion get 410
        self.forbidden: set[tuple[str, str]] = set()  # (resource key, verb)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (verb, resource key, query)
        self._throttle: tuple[int, int] = (0, 0)  # (requests left to refuse, Retry-After seconds)
        self._watchers: list[_Watcher] = []
        self._changed = asyncio.Event()  # replaced and set on every request and write
        self._runner: web.AppRunner | None = None
        self._stall_forever = asyncio.Event()
        self.scheme = "http"
        self.port = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def pool_config(self, inference_pool: str, namespace: str = "default") -> Json:
        """The picker's `pool` config section that follows `inference_pool` through this server."""
        kubernetes = {"inference_pool": inference_pool, "namespace": namespace, "api_server": self.url,
                      "ca_file": None}  # fmt: skip
        return {"name": inference_pool, "discovery": "kubernetes", "endpoints": [], "kubernetes": kubernetes}

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            app.router.add_route("*", prefix + "/namespaces/{ns}/{resource}", self._collection)
            app.router.add_route("*", prefix + "/namespaces/{ns}/{resource}/{name}", self._one)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        self.scheme = "https" if ssl_context is not None else "http"
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._stall_forever.set()
        self.close_watches(abort=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- mutations (the test's side: what controllers and kubelets would do) -------------------------

    def put(self, key: str, obj: Json) -> None:
        self._write(key, obj)

    def put_pod(self, pod: Json) -> None:
        self._write(PODS, pod)

    def put_pool(self, pool: Json) -> None:
        self._write(POOLS, pool)

    def update_pod(self, name: str, change: Callable[[Json], None], namespace: str = "default") -> None:
        pod = copy.deepcopy(self.objects[PODS][(namespace, name)])
        change(pod)
        self._write(PODS, pod)

    def delete(self, key: str, name: str, namespace: str = "default") -> None:
        self._delete(key, namespace, name)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        self._delete(PODS, namespace, name)

    def delete_pool(self, name: str, namespace: str = "default") -> None:
        self._delete(POOLS, namespace, name)

    def lease(self, name: str, namespace: str = "default") -> Json | None:
        return self.objects[LEASES].get((namespace, name))

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older resourceVersions become 410 Gone."""
        self.history.clear()
        self.compacted_rv = self.rv

    def forbid(self, resource: str, verb: str) -> None:
        self.forbidden.add((resource, verb))

    def allow(self, resource: str, verb: str) -> None:
        self.forbidden.discard((resource, verb))

    def uninstall(self, key: str) -> None:
        """As deleting the CRD: the kind's objects and paths are gone, its watches end."""
        self.installed.discard(key)
        self.objects[key].clear()
        for watcher in self._watchers:
            if watcher.resource == key:
                watcher.queue.put_nowait(None)

    def install(self, key: str) -> None:
        self.installed.add(key)

    def throttle(self, count: int, retry_after: int) -> None:
        """Answer the next `count` requests 429 Too Many Requests with `Retry-After: retry_after`."""
        self._throttle = (count, retry_after)

    def stall_watches(self) -> None:
        """Every open watch goes silent: no events, no bookmarks, no end, the connection stays open."""
        for watcher in self._watchers:
            watcher.stalled = True
            watcher.queue.put_nowait(None)  # wake it up to notice

    def close_watches(self, abort: bool = False, drop_pending: bool = False) -> None:
        """End every open watch: normally (end of stream) or by cutting the TCP connection (`abort`).
        `drop_pending` discards events not yet written to them."""
        for watcher in self._watchers:
            if drop_pending:
                while not watcher.queue.empty():
                    watcher.queue.get_nowait()
            if abort and watcher.request is not None and watcher.request.transport is not None:
                watcher.request.transport.abort()
            watcher.queue.put_nowait(None)

    async def wait_requests(self, predicate: Callable[[list[tuple[str, str, dict[str, str]]]], bool]) -> None:
        """Wait until the request log satisfies `predicate` (e.g. "at least 3 lists of pods")."""
        await self.wait_objects(lambda: predicate(self.requests))

    async def wait_objects(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate` holds, checked after every request and write."""
        while not predicate():
            await self._changed.wait()

    def count(self, verb: str, resource: str) -> int:
        return sum(1 for v, r, _ in self.requests if v == verb and r == resource)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _write(self, resource: str, obj: Json) -> Json:
        obj = copy.deepcopy(obj)
        key = (obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        old = self.objects[resource].get(key)
        if old is not None:
            obj["metadata"].setdefault("creationTimestamp", old["metadata"].get("creationTimestamp"))
            obj["metadata"].setdefault("uid", old["metadata"].get("uid"))
        else:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            obj["metadata"].setdefault("creationTimestamp", stamp)
        self.objects[resource][key] = obj
        self._emit(_Event(resource, self.rv, old, obj))
        self._notify()
        return obj

    def _delete(self, resource: str, namespace: str, name: str) -> None:
        old = self.objects[resource].pop((namespace, name))
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(_Event(resource, self.rv, old, gone, deleted=True))
        self._notify()

    def _emit(self, event: _Event) -> None:
        self.history.append(event)
        for watcher in self._watchers:
            if watcher.resource == event.resource:
                watcher.queue.put_nowait(event)

    # -- HTTP -----------------------------------------------------------------------------------------

    @staticmethod
    def _status(code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        return web.json_response(body, status=code, headers=headers)

    async def _log(self, verb: str, resource: str, request: web.Request) -> None:
        self.requests.append((verb, resource, dict(request.query)))
        self._notify()

    def _lookup(self, request: web.Request) -> tuple[Kind | None, str]:
        """(the kind if installed, the key the request log names it by)."""
        info = request.match_info
        api = f"{info['group']}/{info['version']}" if "group" in info else info["version"]
        for kind in self.kinds.values():
            if kind.api == api and kind.resource == info["resource"]:
                return (kind if kind.key in self.installed else None), kind.key
        return None, info["resource"]

    def _deny(self, verb: str, kind: Kind, request: web.Request) -> web.Response | None:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        left, retry_after = self._throttle
        if left > 0:
            self._throttle = (left - 1, retry_after)
            return self._status(429, "TooManyRequests", "Too many requests, please try again later.",
                                headers={"Retry-After": str(retry_after)})  # fmt: skip
        if (kind.key, verb) in self.forbidden:
            return self._status(
                403,
                "Forbidden",
                f'{kind.resource} is forbidden: User "system:serviceaccount:default:epp" cannot {verb} '
                f'resource "{kind.resource}" in API group "{kind.group}" in the namespace '
                f'"{request.match_info["ns"]}"',
            )
        return None

    @staticmethod
    def _not_found() -> web.Response:
        return KubeApi._status(404, "NotFound", "the server could not find the requested resource")

    async def _one(self, request: web.Request) -> web.StreamResponse:
        kind, logged_as = self._lookup(request)
        verb = {"GET": "get", "PUT": "update"}.get(request.method, request.method.lower())
        await self._log(verb, logged_as, request)
        if kind is None:
            return self._not_found()
        if (denied := self._deny(verb, kind, request)) is not None:
            return denied
        key = (request.match_info["ns"], request.match_info["name"])
        stored = self.objects[kind.key].get(key)
        if request.method == "GET":
            if stored is None:
                return self._status(404, "NotFound", f'{kind.resource} "{key[1]}" not found')
            return web.json_response(stored)
        if request.method != "PUT":
            return self._status(405, "MethodNotAllowed", f"{request.method} is not supported here")
        body = await request.json()
        if stored is None:
            return self._status(404, "NotFound", f'{kind.resource} "{key[1]}" not found')
        sent = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if sent != stored["metadata"]["resourceVersion"]:
            return self._status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.resource}.{kind.group} "{key[1]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        body["metadata"]["namespace"] = key[0]
        return web.json_response(self._write(kind.key, body))

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        kind, logged_as = self._lookup(request)
        watching = request.query.get("watch") in ("1", "true")
        verb = "create" if request.method == "POST" else ("watch" if watching else "list")
        await self._log(verb, logged_as, request)
        if kind is None:
            return self._not_found()
        if (denied := self._deny(verb, kind, request)) is not None:
            return denied
        namespace = request.match_info["ns"]
        if request.method == "POST":
            body = await request.json()
            body.setdefault("metadata", {})["namespace"] = namespace
            if (namespace, body["metadata"]["name"]) in self.objects[kind.key]:
                name = body["metadata"]["name"]
                message = f'{kind.resource}.{kind.group} "{name}" already exists'
                return self._status(409, "AlreadyExists", message)
            return web.json_response(self._write(kind.key, body), status=201)
        try:
            by_label = label_matcher(request.query.get("labelSelector", ""))
            by_field = field_matcher(request.query.get("fieldSelector", ""))
        except ValueError as err:
            return self._status(400, "BadRequest", str(err))

        def matches(obj: Json) -> bool:
            return obj["metadata"].get("namespace") == namespace and by_label(obj) and by_field(obj)

        if watching:
            return await self._watch(request, kind, namespace, matches)
        items = [o for o in self.objects[kind.key].values() if matches(o)]
        meta = {"resourceVersion": str(self.rv)}
        return web.json_response(
            {"apiVersion": kind.api, "kind": f"{kind.kind}List", "metadata": meta, "items": items}
        )

    async def _watch(
        self, request: web.Request, kind: Kind, namespace: str, matches: Callable[[Json], bool]
    ) -> web.StreamResponse:
        since_text = request.query.get("resourceVersion", "")
        since = int(since_text) if since_text.isdigit() else 0
        if since and since < self.compacted_rv and self.gone_as_http:
            return self._status(410, "Gone", f"too old resource version: {since} ({self.compacted_rv})")
        watcher = _Watcher(kind.key, namespace, matches, request=request)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind_: str, obj: Json) -> None:
            data = json.dumps({"type": kind_, "object": obj}).encode() + b"\n"
            step = self.split_events or len(data)
            for start in range(0, len(data), step):
                await response.write(data[start : start + step])
                if self.split_events:
                    await asyncio.sleep(0)  # let each piece go out on its own

        try:
            if since and since < self.compacted_rv:
                message = f"too old resource version: {since} ({self.compacted_rv})"
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410}
                await send("ERROR", status | {"reason": "Expired", "message": message})
                await response.write_eof()
                return response
            self._watchers.append(watcher)
            if since:
                for past in self.history:
                    if past.resource == kind.key and past.rv > since:
                        watcher.queue.put_nowait(past)
            else:
                for obj in list(self.objects[kind.key].values()):
                    if matches(obj):
                        await send("ADDED", obj)
            bookmarks = request.query.get("allowWatchBookmarks") == "true"
            timeout = float(request.query.get("timeoutSeconds", "1800"))
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval_s) if bookmarks else left
                try:
                    event: _Event | None = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and left > wait:
                        meta = {"resourceVersion": str(self.rv)}
                        await send("BOOKMARK", {"kind": kind.kind, "apiVersion": kind.api, "metadata": meta})
                    continue
                if watcher.stalled:
                    await self._stall_forever.wait()  # silent, open, until the server stops
                if event is None:
                    break
                old_in = event.old is not None and matches(event.old)
                new_in = not event.deleted and matches(event.new)
                if old_in and new_in:
                    await send("MODIFIED", event.new)
                elif new_in:
                    await send("ADDED", event.new)
                elif old_in:  # deleted, or left the selector: the watch sees it go, with its last state
                    await send("DELETED", event.new)
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # aborted by the test or the client went away
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
        return response
