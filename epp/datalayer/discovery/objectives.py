"""InferenceObjective and InferenceModelRewrite from the cluster, applied to live routing.

Both kinds (v1alpha2) are listed and watched in the pool's namespace under every group/version of
`pool.kubernetes.objective_apis` (default: GIE's `inference.networking.x-k8s.io/v1alpha2` and the llm-d
router's `llm-d.ai/v1alpha2`, which took the same schemas over in 2026). Only objects whose `spec.poolRef`
names our InferencePool (group `inference.networking.k8s.io`, kind `InferencePool`, the defaults) count.
After every change the merged result goes to `on_change(models, objectives)` (`ModelRouter.update`, where
the cluster's entry wins over the config's for the same name).

- **InferenceObjective** `name` → `spec.priority` (unset = 0; negative = sheddable), chosen per request by
  header `x-gateway-inference-objective` / `x-llm-d-inference-objective`.
- **InferenceModelRewrite** rules → model rules. A rule's `matches[].model.value` (type Exact) are the
  client-facing names it rewrites; a rule without matches is the catch-all `"*"`. Targets: `modelRewrite`
  with `weight` (all unset = equal weights; a rule without targets passes the name through). Precedence,
  as the CRD specifies: an exact match beats the catch-all; among objects, the oldest (creationTimestamp)
  wins; within one object, the first rule. The same tie-break (oldest, then the order of objective_apis)
  picks between two InferenceObjectives of one name.
- **Missing CRDs** (404 on the list): one warning per kind and group/version, then checked again every
  `missing_retry_s` (60 s) without logging, so installing the CRD later just works; a CRD removed while
  watched drops its objects. Other errors back off (`kubeapi.Backoff`) and are logged once per kind of
  error until the next successful list.

`synced` is set once every collection has been tried (listed, found missing or failed), so readiness does
not wait for an optional CRD. RBAC: list and watch on both resources in every configured group
(`permissions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from epp.config import ModelRule, Objective, TargetModel
from epp.datalayer.discovery.kubeapi import ApiError, Backoff, Gone, KubeClient
from epp.datalayer.discovery.kubernetes import Problem, api_problem

log = logging.getLogger(__name__)

Json = dict[str, Any]
OBJECTIVES, REWRITES = "inferenceobjectives", "inferencemodelrewrites"
KINDS = {OBJECTIVES: "InferenceObjective", REWRITES: "InferenceModelRewrite"}
POOL_GROUP, POOL_KIND = "inference.networking.k8s.io", "InferencePool"
MISSING_RETRY_S = 60.0
CATCH_ALL = "*"


def permissions(objective_apis: Sequence[str]) -> frozenset[tuple[str, str, str]]:
    """(API group, resource, verb) of every call this module makes with these group/versions."""
    groups = {api.partition("/")[0] for api in objective_apis}
    return frozenset((g, r, v) for g in groups for r in KINDS for v in ("list", "watch"))


@dataclass
class _Collection:
    """One resource under one group/version: what was last listed and watched."""

    api: str  # group/version
    resource: str
    order: int  # position of `api` in objective_apis (tie-break)
    items: dict[str, Json] = field(default_factory=dict)
    tried: bool = False

    @property
    def label(self) -> str:
        return f"{KINDS[self.resource]} ({self.api})"


def _targets_pool(obj: Json, pool: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    return (
        ref.get("name") == pool
        and (ref.get("group") or POOL_GROUP) == POOL_GROUP
        and (ref.get("kind") or POOL_KIND) == POOL_KIND
    )


def _age_key(obj: Json, order: int) -> tuple[str, int, str]:
    meta = obj.get("metadata") or {}
    # RFC 3339 UTC timestamps sort as strings; a missing one sorts last.
    return (str(meta.get("creationTimestamp") or "~"), order, str(meta.get("name") or ""))


def merge_objectives(collections: Sequence[tuple[int, Json]], pool: str) -> list[Objective]:
    """InferenceObjectives (with their group order) of `pool` → one Objective per name, oldest wins."""
    chosen: dict[str, Objective] = {}
    for _, obj in sorted(collections, key=lambda item: _age_key(item[1], item[0])):
        if not _targets_pool(obj, pool):
            continue
        name = str((obj.get("metadata") or {}).get("name") or "")
        priority = (obj.get("spec") or {}).get("priority")
        if name and name not in chosen and (priority is None or isinstance(priority, int)):
            chosen[name] = Objective(name=name, priority=priority or 0)
    return [chosen[name] for name in sorted(chosen)]


def _rule_targets(rule: Json) -> tuple[TargetModel, ...]:
    targets = []
    for target in rule.get("targets") or ():
        model = target.get("modelRewrite") if isinstance(target, dict) else None
        if isinstance(model, str) and model:
            weight = target.get("weight")
            targets.append(TargetModel(model=model, weight=weight if isinstance(weight, int) else 1))
    return tuple(targets)


def merge_rewrites(collections: Sequence[tuple[int, Json]], pool: str) -> list[ModelRule]:
    """InferenceModelRewrites of `pool` → one ModelRule per client-facing name ("*" for the catch-all),
    by the CRD's precedence: oldest object first, then rule order."""
    chosen: dict[str, ModelRule] = {}
    for _, obj in sorted(collections, key=lambda item: _age_key(item[1], item[0])):
        if not _targets_pool(obj, pool):
            continue
        for rule in (obj.get("spec") or {}).get("rules") or ():
            if not isinstance(rule, dict):
                continue
            names = [
                m["model"]["value"]
                for m in rule.get("matches") or ()
                if isinstance(m, dict)
                and isinstance(m.get("model"), dict)
                and (m["model"].get("type") or "Exact") == "Exact"
                and isinstance(m["model"].get("value"), str)
                and m["model"]["value"]
            ]
            if not rule.get("matches"):
                names = [CATCH_ALL]
            for name in names:
                if name in chosen:
                    continue
                try:
                    chosen[name] = ModelRule(name=name, targets=_rule_targets(rule))
                except ValidationError:  # e.g. every weight 0: the CRD forbids it; skip the rule
                    continue
    return [chosen[name] for name in sorted(chosen)]


class ObjectiveWatch:
    """Follows both kinds under every configured group/version and reports the merged rules."""

    def __init__(
        self,
        client: KubeClient,
        inference_pool: str,
        objective_apis: Sequence[str],
        on_change: Callable[[list[ModelRule], list[Objective]], None],
        *,
        backoff: Callable[[], Backoff] = Backoff,
        missing_retry_s: float = MISSING_RETRY_S,
    ) -> None:
        self._client = client
        self._pool = inference_pool
        self._on_change = on_change
        self._new_backoff = backoff
        self._missing_retry_s = missing_retry_s
        self.collections = [
            _Collection(api, resource, order)
            for order, api in enumerate(dict.fromkeys(objective_apis))
            for resource in KINDS
        ]
        self.synced = asyncio.Event()
        self.models: list[ModelRule] = []
        self.objectives: list[Objective] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._published = asyncio.Event()  # replaced and set on every change
        if not self.collections:
            self.synced.set()

    async def start(self) -> None:
        await self._client.open()
        self._tasks = [
            asyncio.create_task(self._run(c), name=f"watch-{c.resource}-{c.api}") for c in self.collections
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def wait_until(self, predicate: Callable[[ObjectiveWatch], bool]) -> None:
        """Wait until `predicate(self)` holds, checked after every applied change (tests, tools)."""
        while not predicate(self):
            await self._published.wait()

    def _path(self, c: _Collection) -> str:
        return f"/apis/{c.api}/namespaces/{self._client.namespace}/{c.resource}"

    def _tried(self, c: _Collection) -> None:
        c.tried = True
        if all(other.tried for other in self.collections):
            self.synced.set()

    def _publish(self) -> None:
        objectives = merge_objectives(
            [(c.order, o) for c in self.collections if c.resource == OBJECTIVES for o in c.items.values()],
            self._pool,
        )
        models = merge_rewrites(
            [(c.order, o) for c in self.collections if c.resource == REWRITES for o in c.items.values()],
            self._pool,
        )
        if (models, objectives) == (self.models, self.objectives):
            return
        self.models, self.objectives = models, objectives
        log.info(
            "routing from the cluster: %d model rule(s) %s, %d objective(s) %s",
            len(models), [m.name for m in models], len(objectives),
            {o.name: o.priority for o in objectives},
        )  # fmt: skip
        self._on_change(models, objectives)
        published, self._published = self._published, asyncio.Event()
        published.set()

    async def _run(self, c: _Collection) -> None:
        backoff = self._new_backoff()
        logged: set[str] = set()
        path = self._path(c)

        def on_event(kind: str, obj: Json) -> None:
            name = str(obj["metadata"]["name"])
            if kind == "DELETED":
                c.items.pop(name, None)
            else:
                c.items[name] = obj
            self._publish()

        while True:
            try:
                listed = await self._client.list(path)
                c.items = {str(o["metadata"]["name"]): o for o in listed.get("items") or ()}
                if logged:
                    log.info("%s: listed again after: %s", c.label, ", ".join(sorted(logged)))
                    logged.clear()
                self._publish()
                self._tried(c)
                await self._client.follow(path, {}, str(listed["metadata"]["resourceVersion"]), on_event)
            except Gone:
                continue
            except ApiError as err:
                delay = backoff.next_delay(err)
                if err.status == 404:
                    if c.items:
                        c.items = {}
                        self._publish()
                    if "missing" not in logged:
                        log.warning(
                            "%s is not served by the API server (CRD not installed?): not applied; "
                            "checking again every %gs",
                            c.label,
                            self._missing_retry_s,
                        )
                    logged.add("missing")
                    delay = self._missing_retry_s
                else:
                    what = f"{c.resource} ({c.api})"
                    problem = api_problem(err, self._client, what, f"list/watch on {what}")
                    self._report(c, problem, logged)
                self._tried(c)
                await asyncio.sleep(delay)
            except Exception as err:  # a bug or a malformed object: log it (once), keep going
                if "unexpected" not in logged:
                    logged.add("unexpected")
                    log.exception("%s: unexpected error, retrying: %s", c.label, err)
                self._tried(c)
                await asyncio.sleep(backoff.next_delay(err))

    @staticmethod
    def _report(c: _Collection, problem: Problem, logged: set[str]) -> None:
        if problem.kind in logged:
            return
        logged.add(problem.kind)
        log.log(problem.level, "%s: %s", c.label, problem.message)


__all__ = ["ObjectiveWatch", "merge_objectives", "merge_rewrites", "permissions"]
