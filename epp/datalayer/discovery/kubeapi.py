"""The Kubernetes API over plain aiohttp: what the pool discovery, the objective watch and leader election
share. One session, bearer-token auth, list / get / create / replace, and watches that cannot hang.

Why not a client library: the picker needs six calls (list, watch, get, create, replace; JSON in and out).
`kubernetes_asyncio` (compatible with our aiohttp pin) would add ~27 MB and five transitive dependencies
to the image, and its leader election neither releases the Lease on shutdown nor uses a monotonic clock.

- **Where**: `api_server` (default `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`), namespace
  from the config or the service account's namespace file, TLS verified against `ca_file` (the system
  store if null).
- **Auth**: bearer token from `token_file`, re-read every `token_refresh_s` (projected tokens rotate) and at
  once after a 401; no token file = no header (e.g. behind `kubectl proxy`).
- **Errors**: every failure is an `ApiError`: `status` is the HTTP status, 0 when there was no answer
  (refused, reset, timed out); `Gone` for 410; `retry_after` from a 429/503's `Retry-After`.
- **Watch liveness** (`follow`): each watch asks the server to end it after `timeoutSeconds` drawn
  uniformly from [W, 2W) (W = `watch_timeout_s`, default 60 s; jitter keeps replicas from reconnecting in
  step) and resumes from the last resourceVersion seen when it does. A watch the server has not ended
  within timeoutSeconds + `watch_grace_s` (10 s) is stalled (no FIN: a dead proxy, a half-open
  connection): it is dropped, logged and resumed. TCP keep-alive on every connection (idle 10 s, then a
  probe every 5 s, 3 unanswered = dead; unacknowledged data times out after 25 s) notices a vanished
  peer within ~25 s even mid-watch. Worst case for a silent stall: 2W + 10 s = 130 s (was ~330 s).
- **Back-off** (`Backoff`): after a failure wait min(cap, base x 2^n) x U[1, 1 + jitter), n = failures
  since the last quiet period (`reset_after_s` without one); a server's Retry-After wins (at most
  `retry_after_max_s`). Defaults 0.5 s, 30 s, 60 s, 0.2, 60 s.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp.config import ConfigError, KubernetesConfig

log = logging.getLogger(__name__)

Json = dict[str, Any]

REQUEST_TIMEOUT_S = 30.0  # one list / get / create / replace
WATCH_TIMEOUT_S = 60.0  # W: timeoutSeconds is drawn from [W, 2W)
WATCH_GRACE_S = 10.0  # a watch not ended by the server within timeoutSeconds + this is stalled
TOKEN_REFRESH_S = 60.0  # client-go re-reads projected tokens every minute too
MAX_EVENT_BYTES = 16 << 20  # one watch event (a pod with big annotations is ~50 KB)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """TCP keep-alive of API connections: a dead peer is noticed after idle + interval x count seconds
    without traffic (10 + 5 x 3 = 25 s), unacknowledged writes after `user_timeout_s`."""

    idle_s: int = 10
    interval_s: int = 5
    count: int = 3
    user_timeout_s: int = 25

    def apply(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        options = {
            "TCP_KEEPIDLE": self.idle_s,
            "TCP_KEEPINTVL": self.interval_s,
            "TCP_KEEPCNT": self.count,
            "TCP_USER_TIMEOUT": self.user_timeout_s * 1000,
        }
        for name, value in options.items():
            option = getattr(socket, name, None)
            if option is not None:  # Linux has all four; other systems keep their defaults
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def socket_factory(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """For aiohttp's `TCPConnector(socket_factory=...)`: a non-blocking socket with keep-alive on."""
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        self.apply(sock)
        return sock


class ApiError(Exception):
    """A failed API call. `status` 0: no answer (connection refused, reset, timed out)."""

    def __init__(
        self, status: int, reason: str, message: str, *, verb: str = "", path: str = "",
        retry_after: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(f"{verb} {path}: {status or 'no answer'} {reason}: {message}".strip())
        self.status, self.reason, self.message = status, reason, message
        self.verb, self.path, self.retry_after = verb, path, retry_after


class Gone(ApiError):
    """410: the resourceVersion watched from was compacted away; list again."""


class Backoff:
    """Delays between retries; see the module docstring for the formula. `clock` defaults to the running
    loop's (virtual in tests), `rng` to a fresh `random.Random`."""

    def __init__(
        self,
        base_s: float = 0.5,
        cap_s: float = 30.0,
        reset_after_s: float = 60.0,
        jitter: float = 0.2,
        retry_after_max_s: float = 60.0,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_s, self.cap_s, self.reset_after_s = base_s, cap_s, reset_after_s
        self.jitter, self.retry_after_max_s = jitter, retry_after_max_s
        self._clock = clock
        self._rng = rng or random.Random()
        self.failures = 0
        self._last_failure: float | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def next_delay(self, error: BaseException | None = None) -> float:
        """The wait before retrying after `error`; counts it as a failure."""
        now = self._now()
        if self._last_failure is not None and now - self._last_failure >= self.reset_after_s:
            self.failures = 0
        self._last_failure = now
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            self.failures += 1
            return float(min(max(retry_after, 0.0), self.retry_after_max_s))
        delay = min(self.cap_s, self.base_s * 2**self.failures)
        self.failures += 1
        return delay * (1 + self.jitter * self._rng.random())


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def status_message(body: bytes) -> tuple[str, str]:
    """(reason, message) of a Kubernetes Status body, or ("", the body itself)."""
    try:
        status = json.loads(body)
        return str(status.get("reason") or ""), str(status.get("message") or status)
    except (ValueError, AttributeError):
        return "", body.decode(errors="replace")[:300]


OnEvent = Callable[[str, Json], None]


class KubeClient:
    """One session to the API server. `open()` resolves the settings (ConfigError for those that cannot fix
    themselves: no API server address, no namespace, unreadable CA) and creates the session."""

    def __init__(
        self,
        config: KubernetesConfig,
        *,
        token_refresh_s: float = TOKEN_REFRESH_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
        watch_grace_s: float = WATCH_GRACE_S,
        keepalive: KeepAlive = KeepAlive(),
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.token_refresh_s = token_refresh_s
        self.request_timeout_s = request_timeout_s
        self.watch_timeout_s = watch_timeout_s
        self.watch_grace_s = watch_grace_s
        self.keepalive = keepalive
        self._rng = rng or random.Random()
        self.namespace = ""
        self.api_server = ""
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_read_at = -float("inf")
        self._warned_no_token = False
        self.stalls = 0  # watches dropped for silence (tests and logs)

    # -- settings and lifecycle ----------------------------------------------------------------------

    def resolve(self) -> None:
        """Fill `namespace` and `api_server` from the config or the pod's environment."""
        cfg = self.config
        self.namespace = cfg.namespace or read_namespace_file(cfg.namespace_file, "pool.kubernetes.namespace")
        self.api_server = (cfg.api_server or in_cluster_api_server()).rstrip("/")

    async def open(self) -> None:
        if self._session is not None:
            return
        self.resolve()
        cfg = self.config
        ssl_context: ssl.SSLContext | bool = True
        if self.api_server.startswith("https://"):
            try:
                ssl_context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            except OSError as err:
                raise ConfigError(f"pool.kubernetes.ca_file: cannot read {cfg.ca_file}: {err}") from None
        connector = aiohttp.TCPConnector(ssl=ssl_context, socket_factory=self.keepalive.socket_factory)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"Accept": "application/json", "User-Agent": "epp"}
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeClient.open() was not called")
        return self._session

    def _auth(self) -> dict[str, str]:
        now = time.monotonic()
        if now - self._token_read_at >= self.token_refresh_s:
            self._token_read_at = now
            try:
                self._token = self.config.token_file.read_text().strip() or None
            except OSError as err:
                self._token = None
                if not self._warned_no_token:
                    self._warned_no_token = True
                    log.warning("cannot read %s (%s): calling the API server without a token",
                                self.config.token_file, err.strerror)  # fmt: skip
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    # -- calls ----------------------------------------------------------------------------------------

    def _error(self, status: int, body: bytes, headers: Any, verb: str, path: str) -> ApiError:
        reason, message = status_message(body)
        if status == 401:
            self._token_read_at = -float("inf")  # the token may have rotated: read it again next time
        retry_after = parse_retry_after(headers.get("Retry-After")) if status in (429, 503) else None
        kind = Gone if status == 410 else ApiError
        return kind(status, reason, message, verb=verb, path=path, retry_after=retry_after)

    async def _call(self, verb: str, method: str, path: str, params: dict[str, str] | None = None,
                    body: Json | None = None) -> Json:  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        try:
            url = self.api_server + path
            async with self.session.request(
                method, url, params=params, json=body, headers=self._auth(), timeout=timeout
            ) as resp:
                data = await resp.read()
                if resp.status not in (200, 201):
                    raise self._error(resp.status, data, resp.headers, verb, path)
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise ApiError(0, type(err).__name__, str(err) or "no answer", verb=verb, path=path) from None
        try:
            out = json.loads(data)
            if not isinstance(out, dict):
                raise ValueError
        except ValueError:
            raise ApiError(200, "BadResponse", f"not JSON: {data[:200]!r}", verb=verb, path=path) from None
        return out

    async def list(self, path: str, params: dict[str, str] | None = None) -> Json:
        """LIST a collection; the result has `items` and `metadata.resourceVersion`."""
        out = await self._call("list", "GET", path, params)
        try:
            str(out["metadata"]["resourceVersion"])
        except (KeyError, TypeError):
            raise ApiError(200, "BadResponse", "not a Kubernetes list", verb="list", path=path) from None
        return out

    async def get(self, path: str) -> Json:
        return await self._call("get", "GET", path)

    async def create(self, path: str, body: Json) -> Json:
        """POST `body` to the collection `path`; 409 AlreadyExists if another client was first."""
        return await self._call("create", "POST", path, body=body)

    async def replace(self, path: str, body: Json) -> Json:
        """PUT `body` (with `metadata.resourceVersion`: 409 Conflict if the object changed since)."""
        return await self._call("update", "PUT", path, body=body)

    # -- watches --------------------------------------------------------------------------------------

    def watch_timeout(self) -> int:
        """timeoutSeconds of the next watch: uniform in [W, 2W), at least 1."""
        return max(1, int(self.watch_timeout_s * (1 + self._rng.random())))

    async def follow(self, path: str, params: dict[str, str], rv: str, on_event: OnEvent) -> None:
        """Watch `path` from resourceVersion `rv` for ever: each watch the server ends (timeoutSeconds) or
        that stalls is resumed from the last resourceVersion seen; bookmarks keep it fresh. `on_event(type,
        object)` gets ADDED / MODIFIED / DELETED. Raises `Gone` (list again), `ApiError` on failures, and
        whatever `on_event` raises."""
        quick_ends = 0
        while True:
            started = time.monotonic()
            rv, events = await self._watch_once(path, params, rv, on_event)
            # A server that ends watches at once, again and again, must not make us spin.
            quick_ends = quick_ends + 1 if events == 0 and time.monotonic() - started < 1.0 else 0
            if quick_ends > 1:
                await asyncio.sleep(min(30.0, 0.5 * 2 ** (quick_ends - 2)))

    async def _watch_once(
        self, path: str, params: dict[str, str], rv: str, on_event: OnEvent
    ) -> tuple[str, int]:
        """One watch request. Returns (last resourceVersion, events seen) when it ends or stalls."""
        timeout_s = self.watch_timeout()
        query = dict(params, watch="1", resourceVersion=rv, allowWatchBookmarks="true",
                     timeoutSeconds=str(timeout_s))  # fmt: skip
        events = 0
        http_timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s)
        try:
            async with asyncio.timeout(timeout_s + self.watch_grace_s) as deadline:
                async with self.session.get(
                    self.api_server + path, params=query, headers=self._auth(), timeout=http_timeout
                ) as resp:
                    if resp.status != 200:
                        raise self._error(resp.status, await resp.read(), resp.headers, "watch", path)
                    async for line in _json_lines(resp, path):
                        kind, obj = _parse_event(line, path)
                        if kind == "ERROR":
                            code = int(obj.get("code") or 0)
                            error = Gone if code == 410 else ApiError
                            raise error(code, str(obj.get("reason") or ""), str(obj.get("message") or obj),
                                        verb="watch", path=path)  # fmt: skip
                        rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                        events += 1
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            on_event(kind, obj)
        except TimeoutError:
            if not deadline.expired():
                raise ApiError(0, "Timeout", "watch timed out", verb="watch", path=path) from None
            self.stalls += 1
            log.warning(
                "watch of %s stalled: no end %ds after asking for %ds (a half-open connection or a stuck "
                "proxy); resuming from resourceVersion %s", path, self.watch_grace_s, timeout_s, rv,
            )  # fmt: skip
        except (aiohttp.ClientError, OSError) as err:
            message = str(err) or "connection lost"
            raise ApiError(0, type(err).__name__, message, verb="watch", path=path) from None
        return rv, events


def _parse_event(line: bytes, path: str) -> tuple[str, Json]:
    try:
        event = json.loads(line)
        kind, obj = str(event.get("type")), event.get("object") or {}
        if not isinstance(obj, dict):
            raise ValueError
    except (ValueError, AttributeError):
        message = f"not a watch event: {line[:200]!r}"
        raise ApiError(200, "BadResponse", message, verb="watch", path=path) from None
    return kind, obj


async def _json_lines(resp: aiohttp.ClientResponse, path: str) -> AsyncIterator[bytes]:
    """Split a watch stream into lines, however the events are cut into chunks (no readline size limit)."""
    buffer = bytearray()
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield line
        if len(buffer) > MAX_EVENT_BYTES:
            raise ApiError(200, "BadResponse", f"a watch event is larger than {MAX_EVENT_BYTES} bytes",
                           verb="watch", path=path)  # fmt: skip
    if buffer.strip():
        yield bytes(buffer)


def read_namespace_file(path: Any, key: str) -> str:
    try:
        namespace = str(path.read_text()).strip()
    except OSError:
        namespace = ""
    if not namespace:
        raise ConfigError(
            f"{key} is not set and {path} is missing or empty (not running in a pod?): set the namespace"
        )
    return namespace


def in_cluster_api_server() -> str:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError(
            "pool.kubernetes.api_server is not set and KUBERNETES_SERVICE_HOST is not in the environment "
            "(not running in a pod?): set api_server, e.g. http://127.0.0.1:8001 behind `kubectl proxy`"
        )
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


__all__ = [
    "ApiError",
    "Backoff",
    "Gone",
    "KeepAlive",
    "KubeClient",
    "in_cluster_api_server",
    "parse_retry_after",
    "read_namespace_file",
]
