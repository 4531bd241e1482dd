"""The Kubernetes manifests in deploy/: they parse, and their names, labels, ports and embedded config agree
with each other and with what epp actually serves (no cluster needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.cli import main as epp_main
from epp.config import load_config
from epp.datastore.kubernetes import parse_pool_spec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = ["epp.yaml", "inferencepool.yaml", "gateway-envoy-ai-gateway.yaml"]


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def epp() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in load("epp.yaml")}


@pytest.fixture(scope="module")
def container(epp: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [main] = epp["Deployment"]["spec"]["template"]["spec"]["containers"]
    return main


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_parse_with_expected_kinds(name: str) -> None:
    expected = {
        "epp.yaml": {
            ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "ConfigMap"), ("apps/v1", "Deployment"),
            ("v1", "Service"),
        },
        "inferencepool.yaml": {("inference.networking.k8s.io/v1", "InferencePool")},
        "gateway-envoy-ai-gateway.yaml": {
            ("gateway.networking.k8s.io/v1", "GatewayClass"), ("gateway.networking.k8s.io/v1", "Gateway"),
            ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        },
    }[name]  # fmt: skip
    docs = load(name)
    assert [(d["apiVersion"], d["kind"]) for d in docs] and {
        (d["apiVersion"], d["kind"]) for d in docs
    } == expected
    assert len(docs) == len(expected)
    for doc in docs:
        assert doc["metadata"]["name"]
        assert "namespace" not in doc["metadata"]  # applied with -n into the pool's namespace


def test_rbac_grants_what_discovery_reads(epp: dict[str, dict[str, Any]]) -> None:
    rules = {(group, resource): set(rule["verbs"]) for rule in epp["Role"]["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}  # fmt: skip
    assert rules == {
        ("", "pods"): {"get", "list", "watch"},
        ("inference.networking.k8s.io", "inferencepools"): {"get", "list", "watch"},
    }
    binding = epp["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": epp["Role"]["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": epp["ServiceAccount"]["metadata"]["name"]}
    ]
    pod_spec = epp["Deployment"]["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == epp["ServiceAccount"]["metadata"]["name"]


def test_deployment_runs_serve_with_the_configmap(
    epp: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    assert container["command"] == ["epp", "serve", "--config", "/etc/epp/config.yaml"]
    pod_spec = epp["Deployment"]["spec"]["template"]["spec"]
    [mount] = container["volumeMounts"]
    [volume] = pod_spec["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/etc/epp"
    assert volume["configMap"]["name"] == epp["ConfigMap"]["metadata"]["name"]
    assert "config.yaml" in epp["ConfigMap"]["data"]


def test_deployment_ports_probes_resources_and_security(
    epp: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    assert {p["containerPort"] for p in container["ports"]} == {9002, 9003, 9090}
    assert container["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    pod_security = epp["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_selects_the_deployments_pods(
    epp: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    deployment, service = epp["Deployment"], epp["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    exposed = {p["port"]: named.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert exposed == {9002: 9002, 9090: 9090}
    extproc = next(p for p in service["spec"]["ports"] if p["port"] == 9002)
    assert extproc.get("appProtocol") != "kubernetes.io/h2c"  # ext_proc is TLS by default


def test_configmap_config_is_valid_and_matches_the_manifests(
    epp: dict[str, dict[str, Any]], container: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(epp["ConfigMap"]["data"]["config.yaml"])
    config = load_config(path)  # the same merge over the embedded defaults as `epp serve --config`
    assert epp_main(["check-config", str(path)]) == 0

    assert config.pool.discovery == "kubernetes"
    assert config.pool.endpoints == ()  # the embedded local sim endpoints must not leak into the cluster
    assert (
        config.pool.kubernetes.inference_pool
        == one(load("inferencepool.yaml"), "InferencePool")["metadata"]["name"]
    )
    assert (
        config.pool.kubernetes.namespace is None and config.pool.kubernetes.api_server is None
    )  # in-cluster
    assert config.server.host == "0.0.0.0"
    assert config.server.tls.enabled
    ports = {p["containerPort"] for p in container["ports"]}
    assert {config.server.extproc_port, config.server.health_port, config.server.metrics_port} == ports
    assert (
        config.server.grace_period_s
        < epp["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_inferencepool_points_at_the_epp_service(epp: dict[str, dict[str, Any]]) -> None:
    pool = one(load("inferencepool.yaml"), "InferencePool")
    spec = parse_pool_spec(pool)  # what discovery will read from it
    assert spec.label_selector and spec.target_ports
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["kind"] == "Service" and ref.get("group", "") == ""
    assert ref["name"] == epp["Service"]["metadata"]["name"]
    assert ref["port"]["number"] == 9002
    assert ref["port"]["number"] in {p["port"] for p in epp["Service"]["spec"]["ports"]}
    assert ref["failureMode"] == "FailClose"


def test_httproute_routes_to_the_inferencepool() -> None:
    docs = load("gateway-envoy-ai-gateway.yaml")
    gateway_class, gateway, route = one(docs, "GatewayClass"), one(docs, "Gateway"), one(docs, "HTTPRoute")
    assert gateway["spec"]["gatewayClassName"] == gateway_class["metadata"]["name"]
    assert [ref["name"] for ref in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    pool_name = one(load("inferencepool.yaml"), "InferencePool")["metadata"]["name"]
    backends = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool_name}]


def test_dockerfile_builds_this_package_as_the_deployments_user(epp: dict[str, dict[str, Any]]) -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert any(line.startswith("RUN pip install .") for line in lines)
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    run_as = epp["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert user.split(":")[0] == str(run_as)


def test_readme_covers_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name
