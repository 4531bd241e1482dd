"""Lease-based leader election (coordination.k8s.io/v1), client-go's algorithm over `kubeapi.KubeClient`.

One Lease `leader_election.lease_name` in the pod's namespace; identity `$POD_NAME` (else hostname + a
random suffix). Every `retry_period_s` (x U[1, 1.2) on a standby) a replica GETs the Lease and:

- creates it, holding it, if there is none (POST; 409 if another replica was first);
- takes it if it has no holder or its holder has not renewed it for `leaseDurationSeconds`, counted on this
  replica's own monotonic clock from when it last saw the record change (no trust in other clocks);
- renews it if it holds it (PUT with the resourceVersion it read: 409 Conflict if someone else wrote in
  between, so two replicas never both succeed).

A leader that has not renewed for `renew_deadline_s` steps down (each attempt is bounded by what is left of
that deadline), before its Lease can lapse for the others (`lease_duration_s` > `renew_deadline_s`).
`stop()` releases a held Lease (empty holder, duration 1 s): the standby takes it at its next check, so a
clean hand-over takes at most retry_period_s x 1.2, a crash at most lease_duration_s + retry_period_s x 1.2.

RBAC: get, update on the Lease (by name), create on leases (`permissions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from epp.config import KubernetesConfig, LeaderElectionConfig
from epp.datalayer.discovery.kubeapi import ApiError, KubeClient, read_namespace_file

log = logging.getLogger(__name__)

GROUP_VERSION = "coordination.k8s.io/v1"
JITTER = 0.2  # client-go's JitterFactor 1.2
Json = dict[str, Any]


def permissions(lease_name: str) -> frozenset[tuple[str, str, str, str | None]]:
    """(API group, resource, verb, resource name or None) of every call the elector makes."""
    group = GROUP_VERSION.partition("/")[0]
    return frozenset({(group, "leases", "get", lease_name), (group, "leases", "update", lease_name),
                      (group, "leases", "create", None)})  # fmt: skip


def default_identity() -> str:
    """$POD_NAME (the Deployment sets it from metadata.name), else hostname + a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def lease_namespace(config: LeaderElectionConfig, kubernetes: KubernetesConfig) -> str:
    """leader_election.namespace, else $POD_NAMESPACE, else the service account's namespace file."""
    return (
        config.namespace
        or os.environ.get("POD_NAMESPACE")
        or read_namespace_file(kubernetes.namespace_file, "leader_election.namespace")
    )


def micro_time(when: dt.datetime | None = None) -> str:
    """A Lease MicroTime: RFC 3339 UTC with microseconds."""
    return (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Runs the election until `stop()`. `on_change(is_leader)` is awaited on every change."""

    def __init__(
        self,
        client: KubeClient,
        config: LeaderElectionConfig,
        namespace: str,
        on_change: Callable[[bool], Awaitable[None]],
        *,
        identity: str | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self.namespace = namespace
        self.identity = identity or default_identity()
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self.is_leader = False
        self.holder: str | None = None  # last holder seen
        self._observed: Json | None = None  # the Lease spec as last seen or written
        self._observed_at = 0.0
        self._resource_version: str | None = None
        self._renewed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._logged: set[str] = set()

    @property
    def path(self) -> str:
        return f"/apis/{GROUP_VERSION}/namespaces/{self.namespace}/leases"

    @property
    def _lease_label(self) -> str:
        return f"Lease {self.namespace}/{self._config.lease_name}"

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._client.open()
        log.info("leader election: %s as %s", self._lease_label, self.identity)
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; a leader releases the Lease (unless `release` is False: a crash stand-in)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.is_leader and release:
            await self._release()
        await self._set_leader(False)

    # -- the loop -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        cfg = self._config
        while True:
            if self.is_leader:
                left = cfg.renew_deadline_s - (self._now() - self._renewed_at)
                budget = max(0.05, left)
            else:
                budget = cfg.renew_deadline_s
            try:
                async with asyncio.timeout(budget):
                    won = await self._try_acquire_or_renew()
            except TimeoutError:
                won = False
                self._log_once(
                    "timeout", logging.WARNING, f"{self._lease_label}: the API server did not answer"
                )
            if won:
                self._renewed_at = self._now()
                self._logged.clear()
                await self._set_leader(True)
            elif self.is_leader and self._now() - self._renewed_at >= cfg.renew_deadline_s:
                log.error(
                    "%s: could not renew for %gs: stepping down (readiness NOT_SERVING)",
                    self._lease_label,
                    cfg.renew_deadline_s,
                )
                await self._set_leader(False)
            period = cfg.retry_period_s
            if not self.is_leader:
                period *= 1 + JITTER * self._rng.random()
            await asyncio.sleep(period)

    async def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if leader:
            log.info("%s: %s is the leader now", self._lease_label, self.identity)
        await self._on_change(leader)

    def _log_once(self, kind: str, level: int, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.log(level, "%s", message)

    # -- one round ------------------------------------------------------------------------------------

    def _spec(self, acquired: str, transitions: int) -> Json:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self._config.lease_duration_s,
            "acquireTime": acquired,
            "renewTime": micro_time(),
            "leaseTransitions": transitions,
        }

    def _remember(self, lease: Json) -> None:
        spec = dict(lease.get("spec") or {})
        if spec != self._observed:
            self._observed = spec
            self._observed_at = self._now()
        self._resource_version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
        holder = spec.get("holderIdentity") or None
        if holder != self.holder:
            self.holder = holder
            if holder != self.identity:
                log.info("%s: held by %s", self._lease_label, holder or "nobody (released)")

    async def _try_acquire_or_renew(self) -> bool:
        name = self._config.lease_name
        try:
            lease = await self._client.get(f"{self.path}/{name}")
        except ApiError as err:
            if err.status != 404:
                self._problem(err, "get")
                return False
            body = {
                "apiVersion": GROUP_VERSION,
                "kind": "Lease",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": self._spec(micro_time(), 0),
            }
            try:
                created = await self._client.create(self.path, body)
            except ApiError as err:
                if err.status != 409:  # 409: another replica created it first
                    self._problem(err, "create")
                return False
            self._remember(created)
            return True
        self._remember(lease)
        spec = self._observed or {}
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self._config.lease_duration_s)
        if holder and holder != self.identity and self._observed_at + duration > self._now():
            return False  # held by another replica, not yet lapsed
        mine = holder == self.identity
        acquired = str(spec.get("acquireTime") or micro_time()) if mine else micro_time()
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        updated = dict(lease, spec=self._spec(acquired, transitions))
        try:
            written = await self._client.replace(f"{self.path}/{name}", updated)
        except ApiError as err:
            if err.status != 409:  # 409: someone else wrote it since our GET; try again next round
                self._problem(err, "update")
            return False
        self._remember(written)
        return True

    async def _release(self) -> None:
        """Hand the Lease back: empty holder, 1 s duration (client-go's release)."""
        now = micro_time()
        spec = dict(self._observed or {})
        spec.update(holderIdentity="", leaseDurationSeconds=1, acquireTime=now, renewTime=now)
        body = {
            "apiVersion": GROUP_VERSION,
            "kind": "Lease",
            "metadata": {
                "name": self._config.lease_name,
                "namespace": self.namespace,
                "resourceVersion": self._resource_version,
            },
            "spec": spec,
        }
        try:
            async with asyncio.timeout(self._config.renew_deadline_s):
                await self._client.replace(f"{self.path}/{self._config.lease_name}", body)
            log.info("%s: released", self._lease_label)
        except (ApiError, TimeoutError) as err:
            log.warning(
                "%s: could not release (%s); the standby takes over when it lapses", self._lease_label, err
            )

    def _problem(self, err: ApiError, verb: str) -> None:
        if err.status == 403:
            message = (
                f"{self._lease_label}: 403 Forbidden to {verb} leases: {err.message}. The picker's "
                "ServiceAccount needs get/update on this Lease and create on leases (deploy/base/rbac.yaml)"
            )
            self._log_once(f"forbidden:{verb}", logging.ERROR, message)
        elif err.status == 0:
            self._log_once(
                "connection", logging.WARNING, f"{self._lease_label}: API server unreachable ({err})"
            )
        else:
            self._log_once(f"http_{err.status}", logging.WARNING, f"{self._lease_label}: {err}")


__all__ = ["LeaderElector", "default_identity", "lease_namespace", "micro_time", "permissions"]
