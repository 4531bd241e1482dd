"""The rendered objects agree with each other and with epp's config: names, labels, selectors, ports,
probes, RBAC, the gateway wiring of each overlay. What a typo would break silently in a cluster."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from deploy_support import (
    DEPLOY,
    Obj,
    config_of,
    container_ports,
    epp_container,
    of_kind,
    one,
    overlay_names,
    render,
)

from epp.config import build_config
from epp.server import required_permissions

AI_GATEWAY = "overlays/envoy-ai-gateway"
ENVOY_GATEWAY = "overlays/envoy-gateway"
GATEWAY_NAMESPACE = "envoy-gateway-system"  # Envoy Gateway runs its Envoy pods here by default
DESTINATION_HEADER = "x-gateway-destination-endpoint"


@pytest.fixture(scope="module", params=overlay_names())
def overlay(request: pytest.FixtureRequest, kubectl: str) -> tuple[str, tuple[Obj, ...]]:
    return request.param, render(kubectl, request.param)


def objs_of(overlay: tuple[str, tuple[Obj, ...]]) -> tuple[Obj, ...]:
    return overlay[1]


def pod_labels(objs: tuple[Obj, ...]) -> dict[str, str]:
    labels: dict[str, str] = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def service_target(service: Obj, port: int, container: Obj) -> int:
    """The container port a Service port reaches (targetPort by name or number)."""
    [entry] = [p for p in service["spec"]["ports"] if p["port"] == port]
    target = entry.get("targetPort", port)
    return container_ports(container)[target] if isinstance(target, str) else target


# --- names and RBAC -----------------------------------------------------------------------------------------


def test_names_follow_the_pool_epp_pattern(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    pool = config_of(objs)["pool"]["name"]
    assert one(objs, "InferencePool")["metadata"]["name"] == pool
    for kind in ("ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "NetworkPolicy"):
        assert f"{pool}-epp" in {o["metadata"]["name"] for o in of_kind(objs, kind)}, kind
    # The generated ConfigMap carries a content hash, so a config change rolls the pods.
    [configmap] = of_kind(objs, "ConfigMap")
    assert re.fullmatch(rf"{pool}-epp-config-[a-z0-9]{{10}}", configmap["metadata"]["name"])


def test_role_grants_exactly_what_epp_calls(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    """The Role's rules are exactly the API calls epp makes with this config (`required_permissions`, which
    tests/integration/test_high_availability.py checks against the calls really made): nothing missing,
    nothing extra; names wherever RBAC can limit by name (not `create`, not list/watch of collections)."""
    objs = objs_of(overlay)
    grants = {
        (group, resource, verb, name)
        for rule in one(objs, "Role")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }
    assert grants == set(required_permissions(build_config(config_of(objs))))


def test_rolebinding_binds_the_role_to_the_pods_service_account(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    account = one(objs, "ServiceAccount")["metadata"]["name"]
    binding = one(objs, "RoleBinding")
    role = one(objs, "Role")["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account


# --- the Deployment against epp's config --------------------------------------------------------------------


def test_deployment_runs_serve_with_the_generated_configmap(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    deployment = one(objs, "Deployment")
    container = epp_container(deployment)
    assert [*container.get("command", []), *container.get("args", [])] == [
        "epp", "serve", "--config", "/etc/epp/config.yaml",
    ]  # fmt: skip
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [config_volume] = [v for v in volumes.values() if "configMap" in v]
    assert config_volume["configMap"]["name"] == one(objs, "ConfigMap")["metadata"]["name"]
    assert mounts[config_volume["name"]]["mountPath"] == "/etc/epp"
    assert mounts[config_volume["name"]].get("readOnly") is True


def test_ports_and_probes_match_the_config(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    server = config_of(objs)["server"]
    container = epp_container(one(objs, "Deployment"))
    ports = container_ports(container)
    assert set(ports.values()) == {server["extproc_port"], server["health_port"], server["metrics_port"]}
    assert server["admin_port"] not in ports.values()  # localhost only, never a container port
    assert server["admin_host"] == "127.0.0.1"
    assert server["host"] == server["metrics_host"] == "0.0.0.0"
    for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"),
                           ("readinessProbe", "readiness")):  # fmt: skip
        assert container[probe]["grpc"] == {"port": server["health_port"], "service": service}, probe


def test_pod_identity_for_leader_election(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    config = config_of(objs)
    assert config["leader_election"]["enabled"] is True
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in epp_container(deployment)["env"]
    }
    assert env["POD_NAME"] == "metadata.name"
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    # A standby is never Ready: a rollout must not wait for new pods to turn Ready before removing old ones.
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "Recreate" or strategy["rollingUpdate"]["maxUnavailable"] == "100%"


def test_shutdown_fits_in_the_termination_grace_period(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    """SIGTERM starts epp's own drain (readiness off and the Lease released at once, drain_s of serving,
    then grace_period_s for streams in flight): the kubelet must not SIGKILL before it ends, and no preStop
    hook may delay the SIGTERM (it would delay the readiness change and the Lease hand-over with it)."""
    objs = objs_of(overlay)
    server = config_of(objs)["server"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= server["drain_s"] + server["grace_period_s"] + 5
    assert "preStop" not in (epp_container(one(objs, "Deployment")).get("lifecycle") or {})


def test_pod_is_locked_down(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    container = epp_container(one(objs, "Deployment"))
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == 65532
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_replicas_spread_over_nodes(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    labels = pod_labels(objs)
    by_node = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node and by_node[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_node[0]["labelSelector"]["matchLabels"].items() <= labels.items()


# --- Service, disruptions, NetworkPolicy --------------------------------------------------------------------


def test_service_selects_the_pods_and_exposes_extproc_and_metrics(
    overlay: tuple[str, tuple[Obj, ...]],
) -> None:
    objs = objs_of(overlay)
    server = config_of(objs)["server"]
    deployment = one(objs, "Deployment")
    labels = pod_labels(objs)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(objs, "Service", f"{config_of(objs)['pool']['name']}-epp")
    assert service["spec"]["selector"].items() <= labels.items()
    container = epp_container(deployment)
    assert {p["port"]: service_target(service, p["port"], container) for p in service["spec"]["ports"]} == {
        server["extproc_port"]: server["extproc_port"],
        server["metrics_port"]: server["metrics_port"],
    }


def test_no_disruption_budget_can_block_a_drain(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    """Only the leader is Ready, so a PodDisruptionBudget over the picker pods would either protect nothing
    (the standby) or forbid evicting the leader for ever (a node drain that never ends). The evicted leader
    releases the Lease on SIGTERM instead; the replicas never share a node (DoNotSchedule spread), so one
    drain never takes both."""
    objs = objs_of(overlay)
    labels = pod_labels(objs)
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), pdb["metadata"]["name"]
    assert config_of(objs)["leader_election"]["enabled"] is True


def test_networkpolicy_admits_only_gateway_and_prometheus(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    server = config_of(objs)["server"]
    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(objs).items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    container = epp_container(one(objs, "Deployment"))
    named = container_ports(container)
    allowed: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            number = named[port["port"]] if isinstance(port["port"], str) else port["port"]
            assert number in named.values(), f"NetworkPolicy port {port['port']} is no container port"
            allowed.setdefault(number, []).extend(rule["from"])
    assert set(allowed) == {server["extproc_port"], server["metrics_port"]}  # not health, not admin
    namespace_of = {n: [p["namespaceSelector"]["matchLabels"] for p in peers] for n, peers in allowed.items()}
    assert namespace_of[server["extproc_port"]] == [{"kubernetes.io/metadata.name": GATEWAY_NAMESPACE}]
    assert namespace_of[server["metrics_port"]] == [{"kubernetes.io/metadata.name": "monitoring"}]


# --- the pool and the gateways ------------------------------------------------------------------------------


def test_inferencepool_points_at_the_epp_service(overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    config = config_of(objs)
    pool = one(objs, "InferencePool")
    assert (
        pool["metadata"]["name"] == config["pool"]["kubernetes"]["inference_pool"] == config["pool"]["name"]
    )
    assert config["pool"]["discovery"] == "kubernetes" and config["pool"]["endpoints"] == []
    ref = pool["spec"]["endpointPickerRef"]
    assert (ref.get("group", ""), ref["kind"], ref["failureMode"]) == ("", "Service", "FailClose")
    service = one(objs, "Service", ref["name"])
    assert service["spec"]["selector"].items() <= pod_labels(objs).items()
    container = epp_container(one(objs, "Deployment"))
    assert service_target(service, ref["port"]["number"], container) == config["server"]["extproc_port"]


def test_gateway_uses_the_cluster_gatewayclass(kubectl: str, overlay: tuple[str, tuple[Obj, ...]]) -> None:
    objs = objs_of(overlay)
    classes = {o["metadata"]["name"] for o in of_kind(render(kubectl, "cluster"), "GatewayClass")}
    gateway = one(objs, "Gateway")
    assert gateway["spec"]["gatewayClassName"] in classes
    route = one(objs, "HTTPRoute")
    assert [(p["kind"], p["name"]) for p in route["spec"]["parentRefs"]] == [
        ("Gateway", gateway["metadata"]["name"])
    ]


def test_ai_gateway_routes_to_the_pool_over_tls(kubectl: str) -> None:
    objs = render(kubectl, AI_GATEWAY)
    pool = one(objs, "InferencePool")["metadata"]["name"]
    backends = [ref for rule in one(objs, "HTTPRoute")["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}]
    # AI Gateway always dials the picker with TLS: epp keeps TLS on, and the port does not claim h2c.
    assert config_of(objs)["server"]["tls"]["enabled"] is True
    extproc = one(objs, "Service", f"{pool}-epp")["spec"]["ports"][0]
    assert extproc["port"] == 9002 and extproc.get("appProtocol") != "kubernetes.io/h2c"


def test_envoy_gateway_wiring(kubectl: str) -> None:
    objs = render(kubectl, ENVOY_GATEWAY)
    config = config_of(objs)
    pool = one(objs, "InferencePool")
    route = one(objs, "HTTPRoute")
    route_ref = {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route["metadata"]["name"]}

    # The route's backend is a Service over exactly the pool's pods and port.
    [backend] = [ref for rule in route["spec"]["rules"] for ref in rule["backendRefs"]]
    assert backend.get("kind", "Service") == "Service"
    servers = one(objs, "Service", backend["name"])
    assert servers["spec"]["selector"] == pool["spec"]["selector"]["matchLabels"]
    [port] = [p for p in servers["spec"]["ports"] if p["port"] == backend["port"]]
    assert {port.get("targetPort", port["port"])} == {p["number"] for p in pool["spec"]["targetPorts"]}

    # ext_proc on that route, to the epp Service's ext_proc port, streamed both ways, envoy.lb received.
    policy = one(objs, "EnvoyExtensionPolicy")
    assert policy["spec"]["targetRefs"] == [route_ref]
    [extproc] = policy["spec"]["extProc"]
    [ref] = extproc["backendRefs"]
    epp_service = one(objs, "Service", ref["name"])
    container = epp_container(one(objs, "Deployment"))
    assert service_target(epp_service, ref["port"], container) == config["server"]["extproc_port"]
    assert extproc["processingMode"]["request"]["body"] == "FullDuplexStreamed"
    assert extproc["processingMode"]["response"]["body"] == "FullDuplexStreamed"
    assert "envoy.lb" in extproc["metadata"]["writableNamespaces"]
    # CEL rule of the CRD (not evaluated by the schema check): FullDuplexStreamed requires failOpen false.
    assert extproc.get("failOpen", False) is False
    source = (DEPLOY / ENVOY_GATEWAY / "envoyextensionpolicy.yaml").read_text()
    assert "TODO(response mode): see issue on streamed cost" in source

    # The route's cluster honours the header epp sets.
    traffic = one(objs, "BackendTrafficPolicy")
    assert traffic["spec"]["targetRefs"] == [route_ref]
    assert traffic["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"] == [
        {"header": DESTINATION_HEADER}
    ]

    # TLS choice: cleartext HTTP/2 on both ends.
    assert config["server"]["tls"]["enabled"] is False
    [extproc_port] = [p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"]]
    assert extproc_port["appProtocol"] == "kubernetes.io/h2c"


def test_envoy_gateway_config_differs_from_base_only_in_tls() -> None:
    base = yaml.safe_load((DEPLOY / "base" / "config.yaml").read_text())
    overlay = yaml.safe_load((DEPLOY / ENVOY_GATEWAY / "config.yaml").read_text())
    assert overlay["server"].pop("tls") == {"enabled": False}
    assert base["server"].pop("tls") == {"enabled": True}
    assert overlay == base, "deploy/overlays/envoy-gateway/config.yaml drifted from deploy/base/config.yaml"


def test_servicemonitor_scrapes_the_metrics_port(kubectl: str) -> None:
    for overlay in overlay_names():
        objs = render(kubectl, f"{overlay}+components/servicemonitor")
        monitor = one(objs, "ServiceMonitor")
        service = one(objs, "Service", monitor["metadata"]["name"])
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        port_names = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        [endpoint] = monitor["spec"]["endpoints"]
        assert port_names[endpoint["port"]] == config_of(objs)["server"]["metrics_port"]
        assert endpoint["path"] == "/metrics"
