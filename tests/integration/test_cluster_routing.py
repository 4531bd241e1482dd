"""Model rewrites and objectives from the cluster change live routing, through real Envoy: the picker follows
an InferencePool, InferenceModelRewrite and InferenceObjective objects on the stand-in API server; a change
there (awaited through the objective watch's own change signal) decides the very next request."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from support.kube_api import (
    LLMD_ALPHA,
    KubeApi,
    make_objective,
    make_pod,
    make_pool,
    objectives_key,
    rewrites_key,
)
from support.kube_api import make_rewrite as rewrite

pytestmark = pytest.mark.envoy

GUARD = 60.0  # hang guard only


async def test_rewrites_and_objectives_from_the_cluster_apply_to_the_next_request(upstreams, stack) -> None:
    api = KubeApi(token=None, bookmark_interval_s=0.2)
    await api.start()
    try:
        ups = await upstreams(1)
        api.put_pool(make_pool("llama", {"app": "llama"}, [ups[0].port]))
        api.put_pod(make_pod("model-0", "127.0.0.1", {"app": "llama"}))
        api.put(rewrites_key(), rewrite("canary", [(["llama"], [("llama-v2", None)])]))
        api.put(objectives_key(LLMD_ALPHA), make_objective("batch", 5, api=LLMD_ALPHA))
        server, envoy = await stack(
            [ups[0].address],
            pool=api.pool_config("llama"),
            models=[{"name": "llama", "targets": [{"model": "llama-from-config"}]}],
        )
        async with asyncio.timeout(GUARD):
            await server.discovery.synced.wait()
            await server.objectives.synced.wait()
        watch = server.objectives

        async def chat(model: str, objective: str | None = None) -> tuple[int, dict]:
            headers = {"x-gateway-inference-objective": objective} if objective else {}
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            url = envoy.url + "/v1/chat/completions"
            async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as r:
                return r.status, await r.json()

        # The cluster's rewrite wins over the config's rule for the same name.
        status, seen = await chat("llama")
        assert (status, seen["model"]) == (200, "llama-v2")

        api.put(rewrites_key(), rewrite("canary", [(["llama"], [("llama-v3", None)])]))
        async with asyncio.timeout(GUARD):
            await watch.wait_until(lambda w: w.models and w.models[0].targets[0].model == "llama-v3")
        status, seen = await chat("llama")
        assert (status, seen["model"]) == (200, "llama-v3")

        api.delete(rewrites_key(), "canary")
        async with asyncio.timeout(GUARD):
            await watch.wait_until(lambda w: not w.models)
        status, seen = await chat("llama")
        assert (status, seen["model"]) == (200, "llama-from-config")

        # Objectives: with the pool saturated, priority 5 is served; made sheddable (-1), it is shed (429).
        ups[0].metrics.waiting = 100
        await server.scraper.scrape_all()
        status, _ = await chat("llama", objective="batch")
        assert status == 200
        api.put(objectives_key(LLMD_ALPHA), make_objective("batch", -1, api=LLMD_ALPHA))
        async with asyncio.timeout(GUARD):
            await watch.wait_until(lambda w: [o.priority for o in w.objectives] == [-1])
        await server.scraper.scrape_all()
        status, body = await chat("llama", objective="batch")
        assert status == 429 and body["error"]["code"] == "saturated_shed"
    finally:
        await api.stop()
