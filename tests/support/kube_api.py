"""A stand-in Kubernetes API server for tests: a real HTTP server (aiohttp, 127.0.0.1) that implements the
subset of the API the InferencePool discovery uses, with the real list/watch semantics.

No real API server can run on the test machines, so this one follows the Kubernetes API conventions
closely enough to exercise a client honestly:

- One cluster-wide, increasing resourceVersion (like etcd's revision), stamped on every object written and
  returned as the list's `metadata.resourceVersion`.
- Pods (`/api/v1/namespaces/{ns}/pods`) and InferencePools
  (`/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools[/{name}]`): GET one, LIST, and
  WATCH (`?watch=1|true`). Filters: `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = AND) and
  `fieldSelector` (`metadata.name`, `metadata.namespace`, `=`/`==`/`!=`).
- WATCH from `resourceVersion=R` replays the retained history after R, then streams live events as the
  test mutates objects; without R (or with "0") it starts with a synthetic ADDED for every current object.
  As in Kubernetes, a MODIFIED object that leaves a watch's selector arrives there as DELETED, one that
  enters it as ADDED. `allowWatchBookmarks=true` adds a BOOKMARK every `bookmark_interval_s`;
  `timeoutSeconds` ends the watch normally.
- `compact()` forgets history. A watch from a resourceVersion older than the compaction gets an ERROR event
  with a 410 Status ("too old resource version"), the usual server behaviour; with `gone_as_http=True` the
  request itself answers HTTP 410 instead, as some servers/proxies do.
- Bearer-token check (401 Status), per-resource-and-verb denial (`forbid`, 403 Status worded like RBAC's),
  Status bodies (`{"kind": "Status", "code", "reason", "message"}`) for 404/410/401/403.
- Test controls: `close_watches(abort=...)` ends every open watch cleanly or cuts its connection,
  optionally dropping events still queued for it; `requests` records each request; `wait_requests` awaits
  a count without sleeping.

Not implemented: pagination (`limit`/`continue`), `resourceVersionMatch`, set-based label selectors
(`in`, `notin`), writes over HTTP (tests mutate objects through methods), other resources, admission,
finalizers/graceful deletion timing (the test sets `deletionTimestamp` and deletes explicitly), TLS.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Json = dict[str, Any]
POOL_API = "inference.networking.k8s.io/v1"
PODS, POOLS = "pods", "inferencepools"


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
    resource: str
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


class KubeApi:
    """Holds the objects; the test mutates them with `put_pod` / `delete_pod` / `put_pool` / … and every
    open watch hears about it. `url` is the base address to give the client as `api_server`."""

    def __init__(self, token: str | None = "test-token", bookmark_interval_s: float = 0.5) -> None:
        self.token = token
        self.bookmark_interval_s = bookmark_interval_s
        self.gone_as_http = False
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], Json]] = {PODS: {}, POOLS: {}}
        self.history: list[_Event] = []
        self.compacted_rv = 0  # watches from an older resourceVersion get 410
        self.forbidden: set[tuple[str, str]] = set()  # (resource, verb)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (verb, resource, query)
        self._watchers: list[_Watcher] = []
        self._request_signal = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._collection(PODS))
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_one(PODS))
        app.router.add_get(f"/apis/{POOL_API}/namespaces/{{ns}}/inferencepools", self._collection(POOLS))
        app.router.add_get(
            f"/apis/{POOL_API}/namespaces/{{ns}}/inferencepools/{{name}}", self._get_one(POOLS)
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.close_watches(abort=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- mutations (the test's side: what controllers and kubelets would do) -------------------------

    def put_pod(self, pod: Json) -> None:
        self._write(PODS, pod)

    def put_pool(self, pool: Json) -> None:
        self._write(POOLS, pool)

    def update_pod(self, name: str, change: Callable[[Json], None], namespace: str = "default") -> None:
        pod = copy.deepcopy(self.objects[PODS][(namespace, name)])
        change(pod)
        self._write(PODS, pod)

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        self._delete(PODS, namespace, name)

    def delete_pool(self, name: str, namespace: str = "default") -> None:
        self._delete(POOLS, namespace, name)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older resourceVersions become 410 Gone."""
        self.history.clear()
        self.compacted_rv = self.rv

    def forbid(self, resource: str, verb: str) -> None:
        self.forbidden.add((resource, verb))

    def allow(self, resource: str, verb: str) -> None:
        self.forbidden.discard((resource, verb))

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
        async with self._request_signal:
            await self._request_signal.wait_for(lambda: predicate(self.requests))

    def count(self, verb: str, resource: str) -> int:
        return sum(1 for v, r, _ in self.requests if v == verb and r == resource)

    def _write(self, resource: str, obj: Json) -> None:
        obj = copy.deepcopy(obj)
        key = (obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        old = self.objects[resource].get(key)
        self.objects[resource][key] = obj
        self._emit(_Event(resource, self.rv, old, obj))

    def _delete(self, resource: str, namespace: str, name: str) -> None:
        old = self.objects[resource].pop((namespace, name))
        self.rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(_Event(resource, self.rv, old, gone, deleted=True))

    def _emit(self, event: _Event) -> None:
        self.history.append(event)
        for watcher in self._watchers:
            if watcher.resource == event.resource:
                watcher.queue.put_nowait(event)

    # -- HTTP -----------------------------------------------------------------------------------------

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}  # fmt: skip
        return web.json_response(body, status=code)

    async def _log(self, verb: str, resource: str, request: web.Request) -> None:
        self.requests.append((verb, resource, dict(request.query)))
        async with self._request_signal:
            self._request_signal.notify_all()

    def _deny(self, verb: str, resource: str, request: web.Request) -> web.Response | None:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if (resource, verb) in self.forbidden:
            group = "" if resource == PODS else POOL_API.split("/")[0]
            return self._status(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "system:serviceaccount:default:epp" cannot {verb} resource '
                f'"{resource}" in API group "{group}" in the namespace "{request.match_info["ns"]}"',
            )
        return None

    def _get_one(self, resource: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            await self._log("get", resource, request)
            if (denied := self._deny("get", resource, request)) is not None:
                return denied
            key = (request.match_info["ns"], request.match_info["name"])
            obj = self.objects[resource].get(key)
            if obj is None:
                return self._status(404, "NotFound", f'{resource} "{key[1]}" not found')
            return web.json_response(obj)

        return handle

    def _collection(self, resource: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            watching = request.query.get("watch") in ("1", "true")
            verb = "watch" if watching else "list"
            await self._log(verb, resource, request)
            if (denied := self._deny(verb, resource, request)) is not None:
                return denied
            namespace = request.match_info["ns"]
            try:
                by_label = label_matcher(request.query.get("labelSelector", ""))
                by_field = field_matcher(request.query.get("fieldSelector", ""))
            except ValueError as err:
                return self._status(400, "BadRequest", str(err))

            def matches(obj: Json) -> bool:
                return obj["metadata"].get("namespace") == namespace and by_label(obj) and by_field(obj)

            if watching:
                return await self._watch(request, resource, namespace, matches)
            items = [o for o in self.objects[resource].values() if matches(o)]
            kind = "PodList" if resource == PODS else "InferencePoolList"
            api_version = "v1" if resource == PODS else POOL_API
            meta = {"resourceVersion": str(self.rv)}
            return web.json_response(
                {"apiVersion": api_version, "kind": kind, "metadata": meta, "items": items}
            )

        return handle

    async def _watch(
        self, request: web.Request, resource: str, namespace: str, matches: Callable[[Json], bool]
    ) -> web.StreamResponse:
        since_text = request.query.get("resourceVersion", "")
        since = int(since_text) if since_text.isdigit() else 0
        if since and since < self.compacted_rv and self.gone_as_http:
            return self._status(410, "Gone", f"too old resource version: {since} ({self.compacted_rv})")
        watcher = _Watcher(resource, namespace, matches, request=request)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        kind = "Pod" if resource == PODS else "InferencePool"
        api_version = "v1" if resource == PODS else POOL_API

        async def send(kind_: str, obj: Json) -> None:
            await response.write(json.dumps({"type": kind_, "object": obj}).encode() + b"\n")

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
                    if past.resource == resource and past.rv > since:
                        watcher.queue.put_nowait(past)
            else:
                for obj in list(self.objects[resource].values()):
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
                        await send("BOOKMARK", {"kind": kind, "apiVersion": api_version, "metadata": meta})
                    continue
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
