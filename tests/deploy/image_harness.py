"""Runs the built image contents the way the Deployment runs them, without a container engine. Started by
test_image_contents.py as root inside fresh network and mount namespaces (`unshare --net --mount`), so the
fixed ports of the deploy config (9002/9003/9004/9090, API server 6443) collide with nothing on the machine.

In the namespaces it lays out the pod's filesystem as read-only overlays: /opt (the image's /opt/epp venv),
/etc (plus /etc/epp/config.yaml, the ConfigMap's file), /run (the service-account volume at
/var/run/secrets/kubernetes.io/serviceaccount: token, ca.crt, namespace), a tmpfs /tmp (the emptyDir), and
the root filesystem remounted read-only. It serves the stand-in API server over TLS on 127.0.0.1:6443 (its
certificate is the CA file) with the InferencePool "llama" and one model-server pod, and a model server's
/metrics on 127.0.0.1. Then `epp serve --config /etc/epp/config.yaml` runs as 65532:65532 with no
capabilities and no_new_privs (setpriv), with the Deployment's environment (POD_NAME, POD_NAMESPACE,
KUBERNETES_SERVICE_HOST/PORT). It waits for readiness SERVING (health Watch stream), inspects the process,
asks the admin API through the image's own `epp endpoints`, sends SIGTERM and waits for the Lease release
and the exit. The report is one JSON line on stdout.

Usage (root): unshare --net --mount --fork -- python image_harness.py '<json: {"work": dir}>'
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support.*

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.kube_api import KubeApi, make_pod, make_pool
from support.upstream import Upstream

from epp.tls import self_signed

UID = GID = 65532
API_PORT = 6443
GUARD = 90.0
SECRETS = "secrets/kubernetes.io/serviceaccount"  # under /run (/var/run is a symlink to it)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def lay_out_filesystem(work: Path) -> None:
    """The pod's view: read-only overlays and root, a writable tmpfs /tmp. Nothing changes on the host."""
    sh("ip", "link", "set", "lo", "up")
    sh("mount", "--make-rprivate", "/")
    for target, upper in (
        ("/opt", work / "opt-upper"),
        ("/etc", work / "etc-upper"),
        ("/run", work / "run-upper"),
    ):
        sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir={upper}:{target}", target)
    sh("mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", "/tmp")
    sh("mount", "-o", "remount,bind,ro", "/")


def listening(port: int) -> str | None:
    """The bind address of a TCP listener on `port`, from /proc/net/tcp{,6}: "0.0.0.0" / "127.0.0.1" (IPv6
    sockets bound to IPv4-mapped addresses, as gRPC makes them, are shown as their IPv4 address)."""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:
                continue
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return str(ip)
    return None


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def as_pod_user(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--", *argv]  # fmt: skip


POD_ENV = {
    "PATH": "/opt/epp/bin:/usr/local/bin:/usr/bin:/bin",  # the Dockerfile's ENV
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/",
    "POD_NAME": "llama-epp-0",
    "POD_NAMESPACE": "default",
    "KUBERNETES_SERVICE_HOST": "127.0.0.1",
    "KUBERNETES_SERVICE_PORT": str(API_PORT),
}


async def until_serving(port: int, proc: asyncio.subprocess.Process) -> None:
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"epp exited with {proc.returncode} before turning ready")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                async for update in stub.Watch(health_pb2.HealthCheckRequest(service="readiness")):
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)  # not listening yet: poll under the caller's guard


async def main(work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    key_pem, cert_pem = self_signed("kubernetes")
    secrets = work / "run-upper" / SECRETS
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("pod-token")
    (secrets / "namespace").write_text("default")
    (secrets / "ca.crt").write_bytes(cert_pem)
    for name in ("token", "namespace", "ca.crt"):
        (secrets / name).chmod(0o644)
    lay_out_filesystem(work)

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    key_file = Path("/tmp/apiserver.key")
    cert_file = Path("/tmp/apiserver.crt")
    key_file.write_bytes(key_pem)
    cert_file.write_bytes(cert_pem)
    tls.load_cert_chain(cert_file, key_file)
    api = KubeApi(token="pod-token", bookmark_interval_s=1.0)
    await api.start(API_PORT, ssl_context=tls)
    model_server = Upstream()
    await model_server.start()
    api.put_pool(make_pool("llama", {"app": "vllm-llama"}, [model_server.port]))
    api.put_pod(make_pod("vllm-llama-0", "127.0.0.1", {"app": "vllm-llama"}))

    proc = await asyncio.create_subprocess_exec(
        *as_pod_user("epp", "serve", "--config", "/etc/epp/config.yaml"),
        env=POD_ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    logs: list[str] = []

    async def collect() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            logs.append(line.decode(errors="replace").rstrip())

    collector = asyncio.ensure_future(collect())
    try:
        started = time.perf_counter()
        async with asyncio.timeout(GUARD):
            await until_serving(9003, proc)
        report["ready_after_s"] = round(time.perf_counter() - started, 3)
        status = proc_status(proc.pid)
        report["uid"], report["gid"] = status["Uid"].split()[0], status["Gid"].split()[0]
        report["cap_eff"], report["no_new_privs"] = status["CapEff"], status["NoNewPrivs"]
        report["listen"] = {str(p): listening(p) for p in (9002, 9003, 9004, 9090)}
        lease = api.lease("llama-epp") or {}
        report["lease_holder"] = (lease.get("spec") or {}).get("holderIdentity")
        endpoints = subprocess.run(
            as_pod_user("epp", "endpoints", "--admin", "127.0.0.1:9004"),
            env=POD_ENV, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        report["endpoints_rc"], report["endpoints_out"] = (
            endpoints.returncode,
            endpoints.stdout + endpoints.stderr,
        )
        probe = (
            "import importlib.util as u, sys; "
            "print(sorted(m for m in ('pip', 'setuptools', 'wheel') if u.find_spec(m))); "
            "open('/opt/epp/probe', 'w')"
        )
        command = as_pod_user("python", "-c", probe)
        writes = subprocess.run(command, env=POD_ENV, capture_output=True, text=True, timeout=60, check=False)
        report["installers_in_image"] = writes.stdout.strip()
        report["write_opt"] = "Read-only file system" in writes.stderr
        report["requests"] = sorted({f"{verb} {resource}" for verb, resource, _ in api.requests})

        proc.send_signal(signal.SIGTERM)
        term = time.perf_counter()
        async with asyncio.timeout(GUARD):
            await api.wait_objects(
                lambda: ((api.lease("llama-epp") or {}).get("spec") or {}).get("holderIdentity") == ""
            )
            report["lease_released_after_s"] = round(time.perf_counter() - term, 3)
            report["exit_code"] = await proc.wait()
            report["exited_after_s"] = round(time.perf_counter() - term, 3)
    except Exception as err:  # reported with the logs, which say why
        report["error"] = f"{type(err).__name__}: {err}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await collector
        report["logs"] = logs[-40:]
        await model_server.stop()
        await api.stop()
    return report


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    result = asyncio.run(main(Path(arguments["work"])))
    print(json.dumps(result))
