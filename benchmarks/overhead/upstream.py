"""An "instant upstream": N fake model servers that cost (almost) nothing, so they are never the bottleneck.

One Envoy process with N listeners on 127.0.0.1 (N ports, one per fake replica). Each listener answers
without any upstream:

    GET  /metrics   200, a static vLLM-style Prometheus page (idle: 0 waiting, 0 running, KV 10 %),
                    so the picker's scraper finds every endpoint healthy and fresh
    anything else   200, a small non-streaming OpenAI chat completion (`application/json`)

Envoy's `direct_response` is answered in C++ on the worker thread, tens of thousands of requests per second
per core, far cheaper than the Python picker being measured. The YAML is written here, not taken from
`envoy/`, because it has nothing in common with the gateway shapes.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from epp_lab.envoy_launcher import Envoy, EnvoyOptions, LaunchError, free_port

MODEL = "m"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

METRICS_PAGE = f"""\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{MODEL}"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.1
"""

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-instant",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "OK."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 256, "completion_tokens": 2, "total_tokens": 258},
    },
    separators=(",", ":"),
)


def _listener(index: int, port: int) -> dict[str, Any]:
    def direct(body: str, content_type: str) -> dict[str, Any]:
        return {
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": content_type},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    return {
        "name": f"replica-{index}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": f"replica_{index}",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"path": "/metrics"},
                                                **direct(METRICS_PAGE, "text/plain; version=0.0.4"),
                                            },
                                            {
                                                "match": {"prefix": "/"},
                                                **direct(COMPLETION, "application/json"),
                                            },
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER_TYPE},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def render(ports: list[int], admin_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [_listener(i, p) for i, p in enumerate(ports)]},
    }


class InstantUpstream:
    """`async with InstantUpstream(256) as up:` → `up.addresses` is the list of `127.0.0.1:port`."""

    def __init__(self, count: int, concurrency: int = 1) -> None:
        self.count = count
        self.concurrency = concurrency
        self.ports: list[int] = []
        self.envoy: Envoy | None = None

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def pid(self) -> int | None:
        return self.envoy.pid if self.envoy else None

    async def start(self, timeout: float = 30.0) -> None:
        ports: set[int] = set()
        while len(ports) < self.count:
            ports.add(free_port())
        self.ports = sorted(ports)
        options = EnvoyOptions(admin_port=free_port(), concurrency=self.concurrency)
        self.envoy = Envoy(options, config=render(self.ports, options.admin_port))
        try:
            await self.envoy.start(timeout)
        except LaunchError as err:
            raise LaunchError(f"instant upstream did not start: {err}") from None

    def verify(self) -> None:
        """Every replica serves its metrics page, the first and last answer a chat completion."""
        for address in self.addresses:
            status, body = http_get(f"http://{address}/metrics")
            if status != 200 or b"vllm:num_requests_waiting" not in body:
                raise LaunchError(f"instant upstream {address}/metrics answered {status}: {body[:200]!r}")
        for address in (self.addresses[0], self.addresses[-1]):
            status, body = http_post(f"http://{address}/v1/chat/completions", b'{"model":"m","messages":[]}')
            if status != 200 or json.loads(body)["object"] != "chat.completion":
                raise LaunchError(f"instant upstream {address} POST answered {status}: {body[:200]!r}")

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None

    async def __aenter__(self) -> InstantUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return int(response.status), response.read()


def http_post(url: str, body: bytes, timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status), response.read()
