"""Who may reach the admin API and /metrics: their own bind addresses (localhost by default), and optional
bearer tokens (401 for /metrics, UNAUTHENTICATED for the admin API); `epp endpoints` sends the token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from epp._generated import epp_admin_pb2 as pb
from epp._generated import epp_admin_pb2_grpc as pb_grpc
from epp.admin.client import DEFAULT_ADMIN
from epp.admin.client import main as admin_main
from epp.config import ConfigError, load_config
from epp.server import Server, bearer_ok


def picker_config(addresses: list[str], **server: Any) -> Any:
    return load_config(None, {
        "server": {"extproc_port": 0, "health_port": 0, "metrics_port": 0, "admin_port": 0,
                   "tls": {"enabled": False}, **server},
        "pool": {"endpoints": addresses},
    })  # fmt: skip


@pytest.fixture
async def protected(upstreams: Any, tmp_path: Path) -> AsyncIterator[tuple[Server, Path, Path]]:
    ups = await upstreams(1)
    admin_token, metrics_token = tmp_path / "admin-token", tmp_path / "metrics-token"
    admin_token.write_text("s3cret-admin\n")
    metrics_token.write_text("s3cret-metrics")
    server = Server(
        picker_config(
            [ups[0].address], admin_token_file=str(admin_token), metrics_token_file=str(metrics_token)
        )
    )
    await server.start()
    yield server, admin_token, metrics_token
    await server.stop()


def test_defaults_keep_admin_and_metrics_on_localhost() -> None:
    server = load_config().server
    assert (server.admin_host, server.admin_port, server.metrics_host) == ("127.0.0.1", 9004, "127.0.0.1")
    assert server.admin_token_file is None and server.metrics_token_file is None
    assert DEFAULT_ADMIN == "127.0.0.1:9004"
    # Asking for a free health port (tests, scripts) frees the admin port too, unless it is given.
    assert load_config(None, {"server": {"health_port": 0}}).server.admin_port == 0
    assert load_config(None, {"server": {"health_port": 0, "admin_port": 9100}}).server.admin_port == 9100


async def test_admin_api_is_on_its_own_port_not_the_health_port(upstreams: Any) -> None:
    ups = await upstreams(1)
    server = Server(picker_config([ups[0].address]))
    ports = await server.start()
    try:
        assert ports.admin not in (ports.health, ports.extproc, ports.metrics)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.admin}") as channel:
            listed = await pb_grpc.AdminStub(channel).ListEndpoints(pb.ListEndpointsRequest())
            assert [e.address for e in listed.endpoints] == [ups[0].address]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.health}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.AdminStub(channel).ListEndpoints(pb.ListEndpointsRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()


async def test_admin_api_wants_the_token(protected: tuple[Server, Path, Path]) -> None:
    server, _, _ = protected
    assert server.ports is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.admin}") as channel:
        stub = pb_grpc.AdminStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-admin"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListEndpoints(pb.ListEndpointsRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListEndpoints(
            pb.ListEndpointsRequest(), metadata=(("authorization", "Bearer s3cret-admin"),)
        )
        assert len(listed.endpoints) == 1


async def test_epp_endpoints_sends_the_token(
    protected: tuple[Server, Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    server, admin_token, _ = protected
    assert server.ports is not None
    address = f"127.0.0.1:{server.ports.admin}"
    # The CLI is synchronous (a blocking gRPC channel): run it off the loop that serves the picker.
    code = await asyncio.to_thread(admin_main, ["endpoints", "--admin", address])
    assert code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    code = await asyncio.to_thread(
        admin_main, ["endpoints", "--admin", address, "--token-file", str(admin_token)]
    )
    assert code == 0 and "pool default-pool" in capsys.readouterr().out
    monkeypatch.setenv("EPP_ADMIN_TOKEN", "s3cret-admin")
    code = await asyncio.to_thread(admin_main, ["explain", "--admin", address, "--model", "m"])
    assert code == 0 and "=> " in capsys.readouterr().out


async def test_metrics_want_the_token(protected: tuple[Server, Path, Path]) -> None:
    server, _, _ = protected
    assert server.ports is not None
    url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic s3cret-metrics"}):
            async with session.get(url, headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.get(url, headers={"Authorization": "Bearer s3cret-metrics"}) as response:
            assert response.status == 200
            assert "inference_pool_ready_pods" in await response.text()


async def test_unreadable_or_empty_token_files_fail_start_up(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"server.admin_token_file: .*empty is empty"):
        await Server(picker_config(["127.0.0.1:1"], admin_token_file=str(empty))).start()
    with pytest.raises(ConfigError, match=r"server.metrics_token_file: cannot read"):
        await Server(picker_config(["127.0.0.1:1"], metrics_token_file=str(tmp_path / "absent"))).start()


def test_bearer_comparison() -> None:
    assert bearer_ok("Bearer abc", "abc") and bearer_ok("bearer  abc ", "abc")
    assert not bearer_ok(None, "abc") and not bearer_ok("Bearer abcd", "abc") and not bearer_ok("abc", "abc")
