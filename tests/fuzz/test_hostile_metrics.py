"""A hostile model server's /metrics page: garbage, absurd or lying numbers. It may attract traffic to itself
or repel it (that is what its numbers are for), but it must never crash the picker: the page parser never
raises, and the picker still routes every request to a pool member with whatever the pages said."""

from __future__ import annotations

import random
from typing import Any

import orjson
from fuzz.strategies import examples
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.virtual_time import run_virtual

from epp.config import load_config
from epp.datalayer.discovery.static import static_endpoints
from epp.datalayer.endpoints import EndpointPool
from epp.datalayer.scrape.extract import parse_metrics
from epp.errors import Rejection
from epp.observability.metrics import RequestMetrics
from epp.requestcontrol.director import Decision, Director
from epp.scheduling.registry import PluginContext, build_scheduler

POOL = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
NOW = 5000.0
NUMBERS = st.sampled_from(
    ["0", "1", "-1", "1e308", "-1e308", "1.7976931348623157e308", "5e-324", "NaN", "+Inf", "-Inf", "1e999",
     "0x10", "", "1_000", "99999999999999999999999"]
) | st.floats(allow_nan=True, allow_infinity=True).map(repr)  # fmt: skip
LABEL = st.sampled_from(
    ['model_name="m"', 'model_name="other"', "", 'x="\\"}{"', 'model_name="m",model_name="n"']
)
NAMES = [
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:num_requests_waiting_total",
]  # fmt: skip


@st.composite
def pages(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.integers(0, 2)):  # mostly a page with every required signal, at any value
        lines += [f"{name} {draw(NUMBERS)}" for name in NAMES[:3]]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9))
        if kind < 6:  # a wanted metric, with any value, sometimes many series of it
            name, labels, value = draw(st.sampled_from(NAMES)), draw(LABEL), draw(NUMBERS)
            for i in range(draw(st.sampled_from([1, 1, 2, 500]))):
                series = f'{labels},i="{i}"' if labels else f'i="{i}"'
                lines.append(f"{name}{{{series}}} {value}")
        elif kind == 6:  # the cache shape, any label values
            size, blocks = draw(NUMBERS), draw(NUMBERS)
            lines.append(f'vllm:cache_config_info{{block_size="{size}",num_gpu_blocks="{blocks}"}} 1')
        elif kind == 7:  # LoRA info with many or odd adapters
            running = ",".join(draw(st.lists(st.text(max_size=8), max_size=5)))
            lines.append(f'vllm:lora_requests_info{{max_lora="{draw(NUMBERS)}",running_lora_adapters='
                         f'"{running}",waiting_lora_adapters=""}} {draw(NUMBERS)}')  # fmt: skip
        elif kind == 8:  # garbage
            lines.append(draw(st.text(max_size=60)))
        else:  # a wanted name cut short or malformed
            lines.append(
                draw(st.sampled_from(NAMES)) + draw(st.sampled_from(["", "{", "{a=", " ", "{} x y"]))
            )
    return "\n".join(lines)


def director(config: dict[str, Any]) -> Director:
    cfg = load_config(None, {"pool": {"endpoints": POOL}, "scheduling": {"seed": 7}, **config})
    pool = EndpointPool(static_endpoints(cfg.pool))
    scheduler = build_scheduler(PluginContext(cfg, pool, random.Random(7)))
    return Director(cfg, pool, scheduler, RequestMetrics(CollectorRegistry()), clock=lambda: NOW)


@settings(max_examples=examples(300))
@given(pages())
def test_a_page_never_crashes_the_parser(page: str) -> None:
    """Found by this test: two series of 1e308 overflowed the sum of the waiting requests (OverflowError
    out of `parse_metrics`, which must never raise: the first scrape at start-up would have stopped the
    picker; later ones, that endpoint's scraping). Now such a page is a bad page."""
    result = parse_metrics(page, "vllm")
    m = result.metrics
    if result.ok:
        for value in (m.waiting, m.running, m.kv_usage):
            assert value == value and abs(value) != float("inf"), (value, page[:200])  # finite
        assert 0.0 <= m.kv_usage <= 1.0
    event("accepted" if result.ok else "bad page")


@settings(max_examples=examples(60))
@given(
    st.lists(pages(), min_size=3, max_size=3),
    st.sampled_from(
        [
            {},
            {"flow_control": {"enabled": True, "ttl_s": 1.0, "no_endpoints_ttl_s": 1.0}},
            {"limits": {"fallback_endpoints": 2}},
        ]
    ),
)
@example(  # found by the long profile: -1e308 and 1e308 waiting made the queue scores NaN, then a 500
    ["vllm:num_requests_waiting -1e308\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0", "",
     "vllm:num_requests_waiting 1e308\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0"],
    {},
)  # fmt: skip
def test_lying_metrics_steer_traffic_but_every_request_still_goes_to_a_pool_member(
    page_texts: list[str], config: dict[str, Any]
) -> None:
    async def main() -> None:  # flow control's queue needs a running loop (a virtual one: no real time)
        d = director(config)
        for endpoint, page in zip(d.pool, page_texts, strict=True):
            result = parse_metrics(page, "vllm")
            if result.ok:  # as the scraper does: a bad page leaves the old (here: no) metrics
                endpoint.metrics = result.snapshot(NOW)
        headers = {":path": "/v1/chat/completions", ":method": "POST"}
        for i in range(4):
            body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "p" * (200 * i)}]})
            try:
                decision = d.decide(headers, body)
            except Rejection as rejection:
                assert rejection.status in (429, 503), rejection
                event(f"rejected {rejection.code}")
                continue
            if not isinstance(decision, Decision):  # held by flow control: nothing routed yet
                d.abandon(decision)
                event("held")
                continue
            assert set(decision.destination.split(",")) <= set(POOL)
            event(f"routed to {decision.destination.split(',')[0]}")
            d.dispatched(decision)
            d.finished(decision, 200)
        assert all(e.inflight_requests == 0 for e in d.pool)

    run_virtual(main())
