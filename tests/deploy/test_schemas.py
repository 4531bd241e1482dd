"""Every kustomization in deploy/ renders, and every object it renders is one the API server would accept in
strict mode: core kinds against Kubernetes' own schemas, custom resources against their real CRDs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from deploy_support import K8S_VERSIONS, Obj, render, render_targets
from k8s_schemas import CoreSchemas, CRDSchemas, structural_to_json_schema

# Kinds rendered by deploy/ that no fixture CRD covers, and why that is acceptable.
NO_SCHEMA = {
    ("monitoring.coreos.com", "ServiceMonitor"): "optional component; the Prometheus Operator CRD is not "
    "among the fixtures (tests/fixtures/k8s/README.md); test_consistency checks its selector and port",
}

# Kinds that exist only at cluster scope among those we use or might plausibly add.
CLUSTER_SCOPED_CORE = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
    "StorageClass", "IngressClass", "RuntimeClass", "PersistentVolume", "APIService",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "CSIDriver", "Node",
}  # fmt: skip


def group_of(obj: Obj) -> str:
    return obj["apiVersion"].rpartition("/")[0]


@pytest.mark.parametrize("target", render_targets())
def test_kustomization_renders(kubectl: str, target: str) -> None:
    objs = render(kubectl, target)
    assert objs, f"{target} rendered nothing"
    keys = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"{target}: duplicate objects"


@pytest.mark.parametrize("target", render_targets())
def test_every_object_validates(
    kubectl: str, target: str, core_schemas: dict[str, CoreSchemas], crd_schemas: CRDSchemas
) -> None:
    problems: list[str] = []
    for obj in render(kubectl, target):
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        if crd_schemas.crd_for(obj) is not None:
            problems += [f"{label}: {e}" for e in crd_schemas.errors(obj)]
        elif core_schemas[K8S_VERSIONS[0]].knows(obj):
            for version, schemas in core_schemas.items():
                problems += [f"{label} (Kubernetes {version}): {e}" for e in schemas.errors(obj)]
        elif (group_of(obj), obj["kind"]) not in NO_SCHEMA:
            problems.append(f"{label}: no schema for {obj['apiVersion']} (add its CRD to the fixtures)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", render_targets())
def test_cluster_scoped_objects_only_under_deploy_cluster(
    kubectl: str, target: str, crd_schemas: CRDSchemas
) -> None:
    for obj in render(kubectl, target):
        crd = crd_schemas.crd_for(obj)
        cluster_scoped = crd.scope == "Cluster" if crd else obj["kind"] in CLUSTER_SCOPED_CORE
        in_cluster_dir = target.split("+")[0] == "cluster"
        assert cluster_scoped == in_cluster_dir, (
            f"{target}: {obj['kind']}/{obj['metadata']['name']} is "
            f"{'cluster' if cluster_scoped else 'namespace'}-scoped; cluster-scoped objects belong in "
            "deploy/cluster and only there"
        )
        # Namespaced objects take their namespace from `kubectl apply -n`: none may hard-code one.
        assert "namespace" not in obj["metadata"], f"{target}: {obj['kind']} sets metadata.namespace"


# --- the validators themselves reject what the API server rejects ------------------------------------------


def _first(kubectl: str, target: str, kind: str) -> Obj:
    return copy.deepcopy(next(o for o in render(kubectl, target) if o["kind"] == kind))


def test_core_validator_rejects_unknown_fields(kubectl: str, core_schemas: dict[str, CoreSchemas]) -> None:
    deployment = _first(kubectl, "base", "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["servce"] = "liveness"
    for schemas in core_schemas.values():
        assert any("servce" in e for e in schemas.errors(deployment))


@pytest.mark.parametrize(
    ("kind", "mutate", "expect"),
    [
        (
            "InferencePool",
            lambda o: o["spec"]["endpointPickerRef"].update(failurMode="FailClose"),
            "failurMode",
        ),
        ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Fail"), "Fail"),
        ("InferencePool", lambda o: o["metadata"].update(labelz={}), "labelz"),
        ("HTTPRoute", lambda o: o["spec"]["rules"][0].update(timeout={"request": "1s"}), "timeout"),
    ],
)
def test_crd_validator_rejects_what_the_api_server_rejects(
    kubectl: str, crd_schemas: CRDSchemas, kind: str, mutate: Any, expect: str
) -> None:
    obj = _first(kubectl, "overlays/envoy-ai-gateway", kind)
    assert crd_schemas.errors(obj) == []
    mutate(obj)
    assert any(expect in e for e in crd_schemas.errors(obj)), crd_schemas.errors(obj)


def test_crd_validator_applies_defaults_before_validating(kubectl: str, crd_schemas: CRDSchemas) -> None:
    pool = _first(kubectl, "overlays/envoy-ai-gateway", "InferencePool")
    del pool["spec"]["endpointPickerRef"]["failureMode"]  # defaulted to FailClose by the API server
    assert crd_schemas.errors(pool) == []


def test_structural_schema_keywords() -> None:
    import jsonschema

    schema = structural_to_json_schema(
        {
            "type": "object",
            "properties": {
                "size": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+Mi$"},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "maybe": {"type": "string", "nullable": True},
                "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        }
    )
    validator = jsonschema.Draft4Validator(schema)
    assert validator.is_valid({"size": 3, "free": {"anything": [1]}, "maybe": None, "closed": {"a": "x"}})
    assert validator.is_valid({"size": "16Mi"})
    assert not validator.is_valid({"size": "16"})  # a string still has to match the pattern
    assert not validator.is_valid({"size": 1.5})
    assert not validator.is_valid({"closed": {"b": "x"}})
    assert not validator.is_valid({"extra": 1})


def test_cel_rules_are_evaluated(kubectl: str, crd_schemas: CRDSchemas) -> None:
    if crd_schemas.cel is None:
        pytest.skip("cel-python is not installed (dev extra): CEL rules of the CRDs are not evaluated")
    policy = _first(kubectl, "overlays/envoy-gateway", "EnvoyExtensionPolicy")
    before = crd_schemas.cel.evaluated
    assert crd_schemas.errors(policy) == []
    assert crd_schemas.cel.evaluated > before
    # The CRD's rule: FullDuplexStreamed body processing forbids failOpen.
    policy["spec"]["extProc"][0]["failOpen"] = True
    assert any("FailOpen must be false" in e for e in crd_schemas.errors(policy))
    # And a Service backendRef needs a port.
    del policy["spec"]["extProc"][0]["failOpen"]
    del policy["spec"]["extProc"][0]["backendRefs"][0]["port"]
    assert any("Must have port for Service reference" in e for e in crd_schemas.errors(policy))
