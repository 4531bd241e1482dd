"""The real-engine tier: real vLLM replicas (CPU, the tiny model), the picker in-process and real Envoy.

One fleet of 2 replicas serves the whole tier (starting one takes ~25-40 s): 128-block KV caches (16k
tokens, so evictions are cheap to cause), adapter `lora-1` preloaded on both, KV events on port + 1. The
tier needs `./dev realengine` (`./dev test` and `./dev test tests/realengine` run it); without the vLLM
environment it is skipped. Every test runs on the session's event loop (the fleet's child processes belong
to it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from epp_lab.realengine.replicas import EngineOptions, RealEngineEnv, RealEngineMissing, RealFleet


@pytest.fixture(scope="session")
def realengine_env() -> RealEngineEnv:
    try:
        return RealEngineEnv.find()
    except RealEngineMissing as err:
        pytest.skip(str(err))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fleet(
    realengine_env: RealEngineEnv, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RealFleet]:
    options = EngineOptions(lora_modules={"lora-1": realengine_env.lora("lora-1")})
    logs = tmp_path_factory.mktemp("vllm-logs")
    async with RealFleet(realengine_env, 2, options, log_dir=logs) as running:
        yield running
