"""parse_metrics (epp.datalayer.scrape.extract): each engine's page, series aggregation, LoRA info, bad
input, and agreement with the reference parser (prometheus_client) on generated pages."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.config import ENGINES
from epp.datalayer.scrape.extract import ParseResult, Problem, parse_metrics


def _load_bench() -> ModuleType:
    # The benchmark's page builder is the realistic vLLM page; test the same page we measure.
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_metrics_parse.py"
    spec = importlib.util.spec_from_file_location("bench_metrics_parse", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_vllm_page = _load_bench().build_vllm_page


def kinds(result: ParseResult) -> set[tuple[str, str]]:
    return {(p.kind, p.metric) for p in result.problems}


VLLM_MINIMAL = """\
vllm:num_requests_waiting{model_name="m"} 2
vllm:num_requests_running{model_name="m"} 3
vllm:kv_cache_usage_perc{model_name="m"} 0.5
"""

SGLANG_PAGE = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="qwen",tp_rank="0"} 5.0
sglang:num_running_reqs{engine_type="unified",model_name="qwen-lora",tp_rank="0"} 2.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",tp_rank="0"} 7.0
sglang:num_queue_reqs{engine_type="unified",model_name="qwen-lora",tp_rank="0"} 1.0
# HELP sglang:num_queue_reqs_total Not the gauge we want.
# TYPE sglang:num_queue_reqs_total counter
sglang:num_queue_reqs_total{model_name="qwen"} 999.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="qwen",tp_rank="0"} 0.31
sglang:token_usage{engine_type="unified",model_name="qwen-lora",tp_rank="0"} 0.62
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="qwen"} 10.0
sglang:time_to_first_token_seconds_bucket{le="0.5",model_name="qwen"} 40.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="qwen"} 42.0
sglang:time_to_first_token_seconds_count{model_name="qwen"} 42.0
sglang:time_to_first_token_seconds_sum{model_name="qwen"} 7.5
# HELP sglang:cache_config_info Information of the cache config.
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{num_pages="131072",page_size="1"} 1.0
"""

TRTLLM_SERVE_PAGE = """\
# HELP trtllm_num_requests_waiting Number of requests waiting.
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{engine_type="trtllm",model_name="llama"} 4
# HELP trtllm_num_requests_running Number of requests running.
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="trtllm",model_name="llama"} 9
# HELP trtllm_kv_cache_utilization KV cache utilization.
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="trtllm",model_name="llama"} 0.75
# HELP trtllm_kv_cache_hit_rate KV cache hit rate.
# TYPE trtllm_kv_cache_hit_rate gauge
trtllm_kv_cache_hit_rate{engine_type="trtllm",model_name="llama"} 0.4
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block{model_name="llama"} 32
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks{model_name="llama"} 8192
# HELP trtllm_e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE trtllm_e2e_request_latency_seconds histogram
trtllm_e2e_request_latency_seconds_bucket{le="0.5",model_name="llama"} 3
trtllm_e2e_request_latency_seconds_bucket{le="+Inf",model_name="llama"} 5
trtllm_e2e_request_latency_seconds_count{model_name="llama"} 5
trtllm_e2e_request_latency_seconds_sum{model_name="llama"} 2.5
"""

TRITON_PAGE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 120
nv_inference_request_success{model="tensorrt_llm",version="1"} 120
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 2
nv_trt_llm_request_metrics{model="tensorrt_llm_2",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm_2",request_type="waiting",version="1"} 3
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1024
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 3072
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 4096
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25
# HELP nv_trt_llm_general_metrics General TRT LLM metrics
# TYPE nv_trt_llm_general_metrics gauge
nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"} 1000
"""


# -- each engine's page -----------------------------------------------------------------------------------


def test_vllm_realistic_page() -> None:
    page = build_vllm_page()
    assert len(page) > 30_000
    result = parse_metrics(page, "vllm")
    assert result.problems == []
    assert result.ok
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (4.0, 16.0, 0.41)
    assert (result.metrics.block_size, result.metrics.num_blocks) == (16, 27910)
    # Series stamped 1003 is current, though it is not the last line.
    assert result.metrics.running_loras == {"sql-lora", "tweet-lora"}
    assert result.metrics.waiting_loras == {"summ-lora"}
    assert result.metrics.max_lora == 4


def test_vllm_older_kv_cache_name() -> None:
    result = parse_metrics(build_vllm_page(kv_usage=(0.7, 0.9), gpu_cache_name=True), "vllm")
    assert result.ok and result.metrics.kv_usage == 0.9


def test_vllm_lora_largest_timestamp_wins_and_empty_adapters() -> None:
    page = build_vllm_page(lora_series=((5.0, "a,b", "c"), (9.0, "", ""), (7.0, "d", "")))
    result = parse_metrics(page, "vllm")
    assert result.metrics.running_loras == frozenset() and result.metrics.waiting_loras == frozenset()
    assert result.metrics.max_lora == 4 and result.problems == []


def test_vllm_optional_metrics_absent() -> None:
    result = parse_metrics(VLLM_MINIMAL, "vllm")
    assert result.ok and result.problems == []
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (2.0, 3.0, 0.5)
    assert (result.metrics.max_lora, result.metrics.block_size, result.metrics.num_blocks) == (0, 0, 0)
    assert result.metrics.running_loras == frozenset()
    assert result.metrics.served_models == {"m"}  # the model_name label: the base model served


def test_served_models_are_the_running_series_model_names() -> None:
    assert parse_metrics(SGLANG_PAGE, "sglang").metrics.served_models == {"qwen", "qwen-lora"}
    unlabelled = "vllm:num_requests_waiting 0\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.1\n"
    assert parse_metrics(unlabelled, "vllm").metrics.served_models == frozenset()


def test_vllm_cache_config_with_unprofiled_blocks() -> None:
    page = VLLM_MINIMAL + 'vllm:cache_config_info{block_size="32",num_gpu_blocks="None"} 1.0\n'
    result = parse_metrics(page, "vllm")
    assert result.ok and (result.metrics.block_size, result.metrics.num_blocks) == (32, 0)
    assert kinds(result) == {("bad-label", "vllm:cache_config_info{num_gpu_blocks}")}


def test_sglang_page() -> None:
    result = parse_metrics(SGLANG_PAGE, "sglang")
    assert result.problems == []
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (8.0, 7.0, 0.62)
    assert (result.metrics.block_size, result.metrics.num_blocks) == (1, 131072)


def test_trtllm_serve_page() -> None:
    result = parse_metrics(TRTLLM_SERVE_PAGE, "trtllm-serve")
    assert result.problems == []
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (4.0, 9.0, 0.75)
    assert (result.metrics.block_size, result.metrics.num_blocks) == (32, 8192)


def test_triton_trtllm_page() -> None:
    result = parse_metrics(TRITON_PAGE, "triton-trtllm")
    assert result.problems == []
    # waiting and scheduled are summed over both models; other request types are ignored.
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (5.0, 7.0, 0.25)
    assert (result.metrics.block_size, result.metrics.num_blocks) == (64, 4096)


def test_counts_sum_and_kv_takes_max_over_series() -> None:
    page = build_vllm_page(
        models=("a", "b", "c"), waiting=(1, 2, 3), running=(4, 5, 6), kv_usage=(0.2, 0.8, 0.5)
    )
    result = parse_metrics(page, "vllm")
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (6.0, 15.0, 0.8)


def test_snapshot_carries_every_field() -> None:
    result = parse_metrics(build_vllm_page(), "vllm")
    snapshot = result.snapshot(123.0)
    assert snapshot.updated_at == 123.0
    assert (snapshot.waiting, snapshot.running, snapshot.kv_usage) == (4.0, 16.0, 0.41)
    assert (snapshot.block_size, snapshot.num_blocks, snapshot.max_lora) == (16, 27910, 4)
    assert snapshot.running_loras == {"sql-lora", "tweet-lora"}


# -- bad and unusual input -----------------------------------------------------------------------------------


def test_nan_and_inf_samples_are_skipped_and_reported() -> None:
    page = """\
vllm:num_requests_waiting{model_name="a"} NaN
vllm:num_requests_waiting{model_name="b"} 3
vllm:num_requests_running{model_name="a"} +Inf
vllm:kv_cache_usage_perc{model_name="a"} NaN
"""
    result = parse_metrics(page, "vllm")
    assert result.metrics.waiting == 3.0
    assert kinds(result) == {
        ("non-finite", "vllm:num_requests_waiting"),
        ("non-finite", "vllm:num_requests_running"),
        ("missing", "vllm:num_requests_running"),  # no finite sample left
        ("non-finite", "vllm:kv_cache_usage_perc"),
        ("missing", "vllm:kv_cache_usage_perc"),
    }
    assert not result.ok


def test_malformed_lines_are_reported_and_skipped() -> None:
    page = """\
vllm:num_requests_waiting{model_name="a" 3
vllm:num_requests_waiting{model_name="b"} three
vllm:num_requests_waiting{model_name="c"} 2
vllm:num_requests_waiting{model_name="d} 5
vllm:num_requests_running
vllm:num_requests_running 4
vllm:kv_cache_usage_perc{model_name="a"} 0.5 not-a-timestamp
vllm:kv_cache_usage_perc{model_name="b"} 0.25
"""
    result = parse_metrics(page, "vllm")
    assert result.ok
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (2.0, 4.0, 0.25)
    unparsable = [p for p in result.problems if p.kind == "unparsable"]
    assert [p.metric for p in unparsable] == ["vllm:num_requests_waiting"] * 3 + ["vllm:kv_cache_usage_perc"]
    assert "three" in str(unparsable[1])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("page", ["", "<html>502 Bad Gateway</html>", "\n\n# just a comment\n", "\x00\xff"])
def test_pages_without_required_metrics_are_not_ok(engine: str, page: str) -> None:
    result = parse_metrics(page, engine)
    assert not result.ok
    assert [p.kind for p in result.problems] == ["missing"] * 3
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (0.0, 0.0, 0.0)


def test_missing_kv_names_the_current_metric() -> None:
    result = parse_metrics(VLLM_MINIMAL.replace("kv_cache", "xx_cache"), "vllm")
    assert kinds(result) == {("missing", "vllm:kv_cache_usage_perc")}
    missing = parse_metrics(TRITON_PAGE.replace('"fraction"', '"frac"'), "triton-trtllm")
    assert kinds(missing) == {
        ("missing", 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}')
    }


def test_unknown_engine() -> None:
    result = parse_metrics(VLLM_MINIMAL, "tgi")
    assert not result.ok and result.problems == [Problem("unknown-engine", "tgi")]


def test_escaped_label_values() -> None:
    page = VLLM_MINIMAL + (
        'vllm:lora_requests_info{max_lora="2",model_name="x}y, \\"q\\"",'
        'running_lora_adapters="a\\"b,c\\\\d , e\\nf",waiting_lora_adapters=""} 10\n'
    )
    result = parse_metrics(page, "vllm")
    assert result.problems == []
    assert result.metrics.running_loras == {'a"b', "c\\d", "e\nf"}
    assert result.metrics.max_lora == 2


def test_name_must_match_exactly() -> None:
    page = """\
vllm:num_requests_waiting_by_reason{reason="capacity"} 50
vllm:num_requests_waiting_total 70
vllm:num_requests_waiting 1
vllm:num_requests_running 2
vllm:kv_cache_usage_perc_other 0.9
vllm:kv_cache_usage_perc 0.1
# HELP vllm:num_requests_waiting 99
# TYPE vllm:num_requests_running gauge
"""
    result = parse_metrics(page, "vllm")
    assert result.problems == []
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (1.0, 2.0, 0.1)


def test_openmetrics_total_name_is_accepted_when_bare_name_is_absent() -> None:
    page = (
        "trtllm_num_requests_waiting_total 3\ntrtllm_num_requests_running 1\ntrtllm_kv_cache_utilization 0\n"
    )
    result = parse_metrics(page, "trtllm-serve")
    assert result.ok and result.metrics.waiting == 3.0


def test_first_line_crlf_timestamps_and_spacing() -> None:
    page = (
        "vllm:num_requests_waiting 5 1700000000000\r\n"
        'vllm:num_requests_running{ model_name = "a" , } 2\r\n'
        "vllm:kv_cache_usage_perc\t1.5e-1"  # no final newline
    )
    result = parse_metrics(page, "vllm")
    assert result.problems == []
    assert (result.metrics.waiting, result.metrics.running, result.metrics.kv_usage) == (5.0, 2.0, 0.15)


def test_kv_usage_is_clamped_to_unit_interval() -> None:
    assert parse_metrics(VLLM_MINIMAL.replace(" 0.5", " 1.2"), "vllm").metrics.kv_usage == 1.0
    assert parse_metrics(VLLM_MINIMAL.replace(" 0.5", " -0.1"), "vllm").metrics.kv_usage == 0.0


# -- agreement with prometheus_client's parser ------------------------------------------------------------


def _reference(page: str, engine: str) -> dict[str, float]:
    """What parse_metrics should return, computed from prometheus_client's parse of the same page."""
    samples = [s for family in text_string_to_metric_families(page) for s in family.samples]

    def values(name: str, **where: str) -> list[float]:
        return [
            s.value
            for s in samples
            if s.name == name
            and all(s.labels.get(k) == v for k, v in where.items())
            and math.isfinite(s.value)
        ]

    def label_max(name: str, key: str) -> int:
        return max((int(s.labels[key]) for s in samples if s.name == name), default=0)

    if engine == "vllm":
        lora = max((s for s in samples if s.name == "vllm:lora_requests_info"), key=lambda s: s.value)
        return {
            "waiting": sum(values("vllm:num_requests_waiting")),
            "running": sum(values("vllm:num_requests_running")),
            "kv_usage": max(values("vllm:kv_cache_usage_perc")),
            "block_size": label_max("vllm:cache_config_info", "block_size"),
            "num_blocks": label_max("vllm:cache_config_info", "num_gpu_blocks"),
            "max_lora": int(lora.labels["max_lora"]),
            "running_loras": len([a for a in lora.labels["running_lora_adapters"].split(",") if a]),
        }
    assert engine == "triton-trtllm"
    blocks = "nv_trt_llm_kv_cache_block_metrics"
    return {
        "waiting": sum(values("nv_trt_llm_request_metrics", request_type="waiting")),
        "running": sum(values("nv_trt_llm_request_metrics", request_type="scheduled")),
        "kv_usage": max(values(blocks, kv_cache_block_type="fraction")),
        "block_size": max(values(blocks, kv_cache_block_type="tokens_per")),
        "num_blocks": max(values(blocks, kv_cache_block_type="max")),
    }


def _as_dict(result: ParseResult, keys: list[str]) -> dict[str, float]:
    return {
        k: len(result.metrics.running_loras) if k == "running_loras" else getattr(result.metrics, k)
        for k in keys
    }


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_prometheus_client_on_generated_vllm_pages(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    # Model names with characters that must be escaped, and a NaN series.
    models = tuple(f'm{i} "q" \\ {{x}}, y' for i in range(n))
    page = build_vllm_page(
        models=models,
        waiting=tuple(float(rng.randint(0, 50)) for _ in range(n)),
        running=tuple(float(rng.randint(0, 50)) if i else math.nan for i in range(n)),
        kv_usage=tuple(round(rng.random(), 4) for _ in range(n)),
        lora_series=tuple((rng.random() * 1e9, f"a{i},b{i}", "") for i in range(rng.randint(1, 5))),
        process_collectors=False,
    )
    expected = _reference(page, "vllm")
    result = parse_metrics(page, "vllm")
    assert _as_dict(result, list(expected)) == expected


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_prometheus_client_on_generated_triton_pages(seed: int) -> None:
    rng = random.Random(seed)
    registry = CollectorRegistry()
    requests = Gauge("nv_trt_llm_request_metrics", "req", ["model", "request_type"], registry=registry)
    blocks = Gauge(
        "nv_trt_llm_kv_cache_block_metrics", "kv", ["model", "kv_cache_block_type"], registry=registry
    )
    latency = Histogram("nv_trt_llm_request_metrics_latency", "h", ["model"], registry=registry)
    for model in (f"trt {i}" for i in range(rng.randint(1, 3))):
        for kind in ("waiting", "scheduled", "context", "max", "active"):
            requests.labels(model, kind).set(rng.randint(0, 100))
        for kind, value in (("fraction", rng.random()), ("tokens_per", 64), ("max", rng.randint(1, 9999))):
            blocks.labels(model, kind).set(value)
        latency.labels(model).observe(rng.random())
    page = generate_latest(registry).decode()
    expected = _reference(page, "triton-trtllm")
    assert _as_dict(parse_metrics(page, "triton-trtllm"), list(expected)) == expected
