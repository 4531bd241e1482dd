"""Fixtures for the deploy/ tests. No cluster and no network: kubectl only renders (`kubectl kustomize`),
schemas come from the kubernetes-validate wheel and tests/fixtures/k8s/crds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # deploy_support, k8s_schemas

from deploy_support import CRD_DIR, K8S_VERSIONS, KUBECTL_HINT, find_kubectl
from k8s_schemas import CELRules, CoreSchemas, CRDSchemas, celpy


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_kubectl()
    if path is None:
        pytest.skip(f"kubectl not found: {KUBECTL_HINT}")
    return path


@pytest.fixture(scope="session")
def core_schemas() -> dict[str, CoreSchemas]:
    return {version: CoreSchemas(version) for version in K8S_VERSIONS}


@pytest.fixture(scope="session")
def crd_schemas(core_schemas: dict[str, CoreSchemas]) -> CRDSchemas:
    # CEL rules are evaluated when cel-python is installed (dev extra); test_cel_rules_are_evaluated says so
    # if it is not.
    cel = CELRules() if celpy is not None else None
    return CRDSchemas(CRD_DIR, object_meta=core_schemas[K8S_VERSIONS[-1]], cel=cel)
