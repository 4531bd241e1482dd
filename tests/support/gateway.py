"""Envoy pieces that only tests use."""

from __future__ import annotations

from typing import Any


def subset_from_header(header: str = "x-test-pin") -> dict[str, Any]:
    """Test-only Lua filter placed before ext_proc: copies request header `header` (ip:port) into the
    gateway's subset hint, as a real gateway sets it, so that the picker can only choose that endpoint."""
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {
                "inline_string": (
                    "function envoy_on_request(h)\n"
                    f"  local v = h:headers():get('{header}')\n"
                    "  if v ~= nil then h:streamInfo():dynamicMetadata():set('envoy.lb.subset_hint',"
                    " 'x-gateway-destination-endpoint-subset', v) end\n"
                    "end\n"
                )
            },
        },
    }
