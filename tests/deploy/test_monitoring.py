"""The Grafana dashboard charts every metric epp exports, and the autoscaling example asks prometheus-adapter
for metrics its rules actually serve."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, one, render

METRICS = [
    "inference_objective_request_total",
    "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds",
    "inference_objective_running_requests",
    "inference_extension_scheduler_e2e_duration_seconds",
    "inference_extension_plugin_duration_seconds",
    "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size",
    "inference_pool_per_pod_queue_size",
    "inference_pool_ready_pods",
    "epp_endpoint_inflight_requests",
    "inference_extension_prefix_indexer_size",
    "inference_extension_prefix_indexer_hit_ratio",
    "inference_extension_flow_control_queue_size",
    "inference_extension_flow_control_queue_bytes",
    "inference_extension_flow_control_request_queue_duration_seconds",
]
HISTOGRAMS = [m for m in METRICS if m.endswith("_seconds")]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


@pytest.mark.parametrize("metric", METRICS)
def test_dashboard_charts_metric(dashboard: dict[str, Any], metric: str) -> None:
    name = f"{metric}_bucket" if metric in HISTOGRAMS else metric
    assert any(re.search(rf"\b{name}\b", e) for e in exprs(dashboard)), metric


def test_dashboard_is_portable(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    for expr in exprs(dashboard):
        assert 'namespace="$namespace"' in expr and expr.count("(") == expr.count(")"), expr


def test_dashboard_configmap_carries_the_json(kubectl: str) -> None:
    configmap = one(render(kubectl, "monitoring"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = configmap["data"]["grafana-dashboard.json"]
    assert json.loads(shipped) == json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())


def test_hpa_reads_metrics_the_adapter_serves(kubectl: str) -> None:
    hpa = one(render(kubectl, "examples/hpa"), "HorizontalPodAutoscaler")
    values = yaml.safe_load((DEPLOY / "examples" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in values["rules"]["external"]}
    pool = one(render(kubectl, "pool"), "InferencePool")["metadata"]["name"]
    assert hpa["spec"]["metrics"]
    for metric in hpa["spec"]["metrics"]:
        external = metric["external"]["metric"]
        assert external["name"] in served and external["name"] in METRICS
        assert external["selector"]["matchLabels"] == {"name": pool}
        rule = served[external["name"]]
        assert re.search(rf"\b{external['name']}\b", rule["seriesQuery"])
        assert "max(" in rule["metricsQuery"]  # leader and standby both export the pool gauges
        assert metric["external"]["target"]["type"] == "Value"  # the gauges are already per-server averages
