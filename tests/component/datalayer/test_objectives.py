"""ObjectiveWatch against the stand-in API server: InferenceObjective / InferenceModelRewrite objects under
both API groups reach the router as they change; a missing or removed CRD is tolerated with one warning."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.kube_api import LLMD_ALPHA, KubeApi, make_objective, make_rewrite, objectives_key, rewrites_key

from epp.config import KubernetesConfig, build_config
from epp.datalayer.discovery.kubeapi import Backoff, KubeClient
from epp.datalayer.discovery.objectives import ObjectiveWatch
from epp.requestcontrol.routing import ModelRouter

TIMEOUT = 30.0  # hang guard for awaited events, never a timing assertion
APIS = ("inference.networking.x-k8s.io/v1alpha2", "llm-d.ai/v1alpha2")


@pytest.fixture
async def api() -> AsyncIterator[KubeApi]:
    server = KubeApi(token=None, bookmark_interval_s=0.05)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def watching(api: KubeApi, tmp_path: Path) -> AsyncIterator[tuple[ObjectiveWatch, ModelRouter]]:
    config = KubernetesConfig(inference_pool="llama", namespace="default", api_server=api.url, ca_file=None,
                              token_file=tmp_path / "none")  # fmt: skip
    client = KubeClient(config)
    router = ModelRouter(build_config({"objectives": [{"name": "batch", "priority": -1}]}), random.Random(1))
    watch = ObjectiveWatch(client, "llama", APIS, router.update,
                           backoff=lambda: Backoff(base_s=0.02, cap_s=0.1), missing_retry_s=0.05)  # fmt: skip
    await watch.start()
    yield watch, router
    await watch.stop()
    await client.close()


async def until(watch: ObjectiveWatch, predicate) -> None:  # type: ignore[no-untyped-def]
    await asyncio.wait_for(watch.wait_until(predicate), TIMEOUT)


async def test_objects_of_both_groups_reach_the_router_as_they_change(
    api: KubeApi, watching: tuple[ObjectiveWatch, ModelRouter]
) -> None:
    watch, router = watching
    await asyncio.wait_for(watch.synced.wait(), TIMEOUT)
    assert router.priority("batch") == -1  # the config's, until the cluster says otherwise

    api.put(objectives_key(), make_objective("batch", 10))
    api.put(objectives_key(LLMD_ALPHA), make_objective("interactive", 20, api=LLMD_ALPHA))
    api.put(
        rewrites_key(LLMD_ALPHA), make_rewrite("canary", [(["llama"], [("llama-v2", None)])], api=LLMD_ALPHA)
    )
    await until(watch, lambda w: len(w.objectives) == 2 and len(w.models) == 1)
    assert (router.priority("batch"), router.priority("interactive")) == (10, 20)
    assert router.resolve("llama").model == "llama-v2"

    api.put(
        rewrites_key(LLMD_ALPHA), make_rewrite("canary", [(["llama"], [("llama-v3", None)])], api=LLMD_ALPHA)
    )
    await until(watch, lambda w: w.models[0].targets[0].model == "llama-v3")
    assert router.resolve("llama").model == "llama-v3"

    api.delete(objectives_key(), "batch")
    await until(watch, lambda w: [o.name for o in w.objectives] == ["interactive"])
    assert router.priority("batch") == -1  # back to the config's


async def test_missing_and_removed_crds_are_tolerated(
    api: KubeApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    api.uninstall(objectives_key(LLMD_ALPHA))
    api.uninstall(rewrites_key(LLMD_ALPHA))
    config = KubernetesConfig(inference_pool="llama", namespace="default", api_server=api.url, ca_file=None,
                              token_file=tmp_path / "none")  # fmt: skip
    client = KubeClient(config)
    router = ModelRouter(build_config({}), random.Random(1))
    watch = ObjectiveWatch(client, "llama", APIS, router.update,
                           backoff=lambda: Backoff(base_s=0.02, cap_s=0.1), missing_retry_s=0.05)  # fmt: skip
    await watch.start()
    try:
        await asyncio.wait_for(watch.synced.wait(), TIMEOUT)
        api.put(rewrites_key(), make_rewrite("rw", [(["llama"], [("llama-v2", None)])]))
        await until(watch, lambda w: len(w.models) == 1)
        await asyncio.wait_for(
            api.wait_requests(lambda _: api.count("list", objectives_key(LLMD_ALPHA)) >= 3), TIMEOUT
        )
        missing = [r.getMessage() for r in caplog.records if "not served by the API server" in r.getMessage()]
        assert sorted(missing) == [
            "InferenceModelRewrite (llm-d.ai/v1alpha2) is not served by the API server (CRD not installed?): "
            "not applied; checking again every 0.05s",
            "InferenceObjective (llm-d.ai/v1alpha2) is not served by the API server (CRD not installed?): "
            "not applied; checking again every 0.05s",
        ]

        api.install(objectives_key(LLMD_ALPHA))  # installed later: picked up
        api.put(objectives_key(LLMD_ALPHA), make_objective("late", 3, api=LLMD_ALPHA))
        await until(watch, lambda w: [o.name for o in w.objectives] == ["late"])

        api.uninstall(rewrites_key())  # the CRD is deleted while watched: its rules go with it
        await until(watch, lambda w: w.models == [])
        assert router.resolve("llama").model == "llama"
    finally:
        await watch.stop()
        await client.close()
