"""Leader election (epp/ha/leader.py) against an in-memory Lease store with the API server's optimistic
concurrency (resourceVersion conflicts), on a virtual-time loop: who leads, when a standby takes over after a
release or a crash, stepping down when renewals fail. Every time is asserted exactly or by its bound."""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import pytest
from support.virtual_time import run_virtual

from epp.config import LeaderElectionConfig
from epp.datalayer.discovery.kubeapi import ApiError
from epp.ha.leader import LeaderElector, permissions

CONFIG = LeaderElectionConfig(enabled=True, lease_name="llama-epp", lease_duration_s=15, renew_deadline_s=10,
                              retry_period_s=2)  # fmt: skip
PATH = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"


class LeaseStore:
    """GET / POST / PUT of Leases with resourceVersion checks; `down` makes every call fail."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.rv = 1
        self.down = False
        self.calls: list[tuple[str, str]] = []
        self.namespace, self.api_server = "ns", "fake://api"

    async def open(self) -> None:
        return None

    def _check(self, verb: str, path: str) -> None:
        self.calls.append((verb, path))
        if self.down:
            raise ApiError(0, "ClientConnectorError", "refused", verb=verb, path=path)

    async def get(self, path: str) -> dict[str, Any]:
        self._check("get", path)
        name = path.rsplit("/", 1)[1]
        if name not in self.leases:
            raise ApiError(404, "NotFound", f'leases "{name}" not found', verb="get", path=path)
        return copy.deepcopy(self.leases[name])

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check("create", path)
        name = body["metadata"]["name"]
        if name in self.leases:
            raise ApiError(409, "AlreadyExists", "exists", verb="create", path=path)
        return self._store(name, body)

    async def replace(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check("update", path)
        name = path.rsplit("/", 1)[1]
        if body["metadata"].get("resourceVersion") != self.leases[name]["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified", verb="update", path=path)
        return self._store(name, body)

    def _store(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = body
        return copy.deepcopy(body)

    def holder(self) -> str:
        return str(self.leases["llama-epp"]["spec"].get("holderIdentity") or "")


class Replica:
    def __init__(self, store: LeaseStore, name: str, seed: int) -> None:
        self.changes: list[tuple[float, bool]] = []
        self.elector = LeaderElector(
            store, CONFIG, "ns", self._changed, identity=name, rng=random.Random(seed)
        )  # type: ignore[arg-type]

    async def _changed(self, leader: bool) -> None:
        self.changes.append((asyncio.get_running_loop().time(), leader))


async def until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)  # virtual time


def test_one_leader_then_a_fast_handover_on_release() -> None:
    async def main() -> tuple[float, float]:
        store = LeaseStore()
        a, b = Replica(store, "a", 1), Replica(store, "b", 2)
        await a.elector.start()
        await until(lambda: a.elector.is_leader)
        await b.elector.start()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(60)  # a renews every 2 s; b keeps checking and never takes over
        assert a.elector.is_leader and not b.elector.is_leader and store.holder() == "a"
        assert store.leases["llama-epp"]["spec"]["leaseTransitions"] == 0
        released = loop.time()
        await a.elector.stop()  # releases
        assert store.holder() in ("", "b")
        await until(lambda: b.elector.is_leader)
        handover = loop.time() - released
        await b.elector.stop()
        return handover, store.leases["llama-epp"]["spec"]["leaseTransitions"]

    handover, transitions = run_virtual(main())
    assert 0 < handover <= CONFIG.retry_period_s * 1.2  # b's next check
    assert transitions == 1


def test_a_crashed_leader_is_replaced_after_the_lease_lapses() -> None:
    async def main() -> float:
        store = LeaseStore()
        a, b = Replica(store, "a", 1), Replica(store, "b", 2)
        await a.elector.start()
        await until(lambda: a.elector.is_leader)
        await b.elector.start()
        await asyncio.sleep(10)
        loop = asyncio.get_running_loop()
        crashed = loop.time()
        await a.elector.stop(release=False)  # no release: the Lease still names a
        assert store.holder() == "a"
        await until(lambda: b.elector.is_leader)
        takeover = loop.time() - crashed
        await b.elector.stop()
        return takeover

    takeover = run_virtual(main())
    # b saw the last renewal at most one of its checks before the crash, and notices the lapse within one.
    assert CONFIG.lease_duration_s - CONFIG.retry_period_s * 1.2 <= takeover
    assert takeover <= CONFIG.lease_duration_s + CONFIG.retry_period_s * 1.2


def test_a_leader_that_cannot_renew_steps_down_before_the_lease_lapses() -> None:
    async def main() -> list[tuple[float, bool]]:
        store = LeaseStore()
        a = Replica(store, "a", 1)
        await a.elector.start()
        await until(lambda: a.elector.is_leader)
        renewed = store.leases["llama-epp"]["spec"]["renewTime"]
        store.down = True
        await until(lambda: not a.elector.is_leader)
        assert store.leases["llama-epp"]["spec"]["renewTime"] == renewed
        store.down = False
        await until(lambda: a.elector.is_leader)  # and takes it back when the API returns
        await a.elector.stop()
        return a.changes

    changes = run_virtual(main())
    assert [leader for _, leader in changes] == [True, False, True, False]
    lost = changes[1][0] - changes[0][0]
    assert CONFIG.renew_deadline_s <= lost < CONFIG.lease_duration_s


def test_simultaneous_candidates_elect_exactly_one() -> None:
    async def main() -> list[bool]:
        store = LeaseStore()
        replicas = [Replica(store, f"r{i}", i) for i in range(5)]
        await asyncio.gather(*(r.elector.start() for r in replicas))
        await asyncio.sleep(30)
        leaders = [r.elector.is_leader for r in replicas]
        for r in replicas:
            await r.elector.stop()
        return leaders

    assert sorted(run_virtual(main())) == [False] * 4 + [True]


def test_permissions_are_the_calls_made() -> None:
    async def main() -> set[str]:
        store = LeaseStore()
        a, b = Replica(store, "a", 1), Replica(store, "b", 2)
        for r in (a, b):
            await r.elector.start()
        await asyncio.sleep(20)
        for r in (a, b):
            await r.elector.stop()
        return {verb for verb, _ in store.calls}

    verbs = run_virtual(main())
    assert {(g, r, v) for g, r, v, _ in permissions("llama-epp")} == {
        ("coordination.k8s.io", "leases", v) for v in verbs
    }


@pytest.mark.parametrize(
    "values",
    [{"lease_duration_s": 10, "renew_deadline_s": 10}, {"renew_deadline_s": 2, "retry_period_s": 2}],
)
def test_config_keeps_the_timings_ordered(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="lease_duration_s > renew_deadline_s"):
        LeaderElectionConfig(**values)
