"""The picker's inputs from a real vLLM: every signal of its /metrics page; LoRA affinity through Envoy."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from support.realengine import Gateway, get_text, post, until

from epp.datalayer.scrape.extract import parse_metrics
from epp_lab.realengine.replicas import RealEngineEnv, RealFleet

pytestmark = [pytest.mark.realengine, pytest.mark.asyncio(loop_scope="session")]

LORA_SERIES = re.compile(r"^vllm:lora_requests_info\{([^}]*)\} ([0-9.eE+-]+)$", re.M)


def lora_series(page: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(v)) for labels, v in LORA_SERIES.findall(page)
    ]


async def test_metrics_parser_reads_every_signal_of_the_real_page(fleet: RealFleet) -> None:
    url = fleet.urls[0]
    idle = parse_metrics(await get_text(url + "/metrics"), "vllm")
    assert idle.ok, idle.problems
    assert (idle.metrics.block_size, idle.metrics.num_blocks) == (128, 128)  # CPU block size; 16 MiB cache
    assert idle.metrics.waiting == idle.metrics.running == 0
    # 24 requests at once on a replica that runs 16: some wait; half of them for the adapter lora-1.
    body = {"prompt": "def handler(request):\n" * 40, "max_tokens": 400, "ignore_eos": True}
    load = [
        asyncio.create_task(post(url + "/v1/completions", {**body, "model": "lora-1" if i % 2 else "base"}))
        for i in range(24)
    ]
    busy = None

    async def loaded() -> bool:
        nonlocal busy
        busy = parse_metrics(await get_text(url + "/metrics"), "vllm")
        m = busy.metrics
        return busy.ok and m.running > 0 and m.waiting > 0 and m.kv_usage > 0 and "lora-1" in m.running_loras

    try:
        await until(loaded, "replica reports running, waiting, KV use and the running adapter")
    finally:
        statuses = [status for status, _, _ in await asyncio.gather(*load)]
    assert busy is not None
    m = busy.metrics
    print(f"\nreal /metrics under load: waiting {m.waiting:g}, running {m.running:g}, KV {m.kv_usage:.3f}, "
          f"block size {m.block_size}, blocks {m.num_blocks}, max_lora {m.max_lora}, running LoRAs "
          f"{sorted(m.running_loras)}")  # fmt: skip
    assert statuses == [200] * 24
    assert m.running + m.waiting <= 24 and m.running <= 16 and 0 < m.kv_usage <= 1
    assert m.max_lora == 2 and not busy.problems
    # The LoRA info gauge keeps one series per label set ever seen; the newest (largest value) is current.
    page = await get_text(url + "/metrics")
    series = lora_series(page)
    assert len(series) >= 2, page
    newest = max(series, key=lambda s: s[1])[0]
    after = parse_metrics(page, "vllm").metrics
    assert after.running_loras == frozenset(a for a in newest["running_lora_adapters"].split(",") if a)


async def test_lora_affinity_routes_to_the_replica_that_has_the_adapter(
    fleet: RealFleet, realengine_env: RealEngineEnv
) -> None:
    """lora-2 is loaded at run time on replica 1 only (a request for it anywhere else is a 404) and kept
    busy there; the picker, seeing it in that replica's metrics, sends every lora-2 request there."""
    home = fleet.urls[1]
    status, _, text = await post(
        home + "/v1/load_lora_adapter",
        {"lora_name": "lora-2", "lora_path": str(realengine_env.lora("lora-2"))},
    )
    assert status == 200, text
    try:
        async with Gateway(fleet.addresses) as gateway:
            keep_busy = asyncio.create_task(
                post(home + "/v1/completions",
                     {"model": "lora-2", "prompt": "x = 1\n", "max_tokens": 3000, "ignore_eos": True})
            )  # fmt: skip
            try:
                picker_view = gateway.server.pool.get(fleet.addresses[1])
                await until(
                    lambda: "lora-2" in picker_view.metrics.running_loras, "picker sees lora-2 running"
                )
                before = await _served(home)
                statuses = []
                for i in range(6):
                    body = {"model": "lora-2", "prompt": f"def f{i}(x):\n    return x", "max_tokens": 4}
                    status, _, text = await post(gateway.url + "/v1/completions", body)
                    statuses.append(status)
                    assert status == 200, f"request {i}: {status} {text[:300]!r}"  # elsewhere: 404
                    assert json.loads(text)["model"] == "lora-2"
                assert await _served(home) - before >= 6
            finally:
                keep_busy.cancel()
    finally:
        await post(home + "/v1/unload_lora_adapter", {"lora_name": "lora-2"})


async def _served(url: str) -> float:
    page = await get_text(url + "/metrics")
    return sum(
        float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} ([0-9.eE+-]+)$", page, re.M)
    )
