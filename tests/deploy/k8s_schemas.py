"""Offline schema validation of Kubernetes objects, as strict as the API server's strict field validation.

- Core kinds (Deployment, Service, ...) against the JSON schemas that the `kubernetes-validate` wheel ships
  for each Kubernetes minor version (its "-strict" variants: unknown fields are errors).
- Custom resources against the `openAPIV3Schema` of their CustomResourceDefinition (tests/fixtures/k8s/crds),
  turned into JSON Schema the way the API server reads a structural schema: schema defaults applied first;
  unknown fields rejected except under `x-kubernetes-preserve-unknown-fields`; `x-kubernetes-int-or-string`
  accepts an integer or a string; `nullable` accepts null; `x-kubernetes-list-type` map/set keys unique;
  `metadata` checked as a real ObjectMeta; CEL rules (`x-kubernetes-validations`) evaluated with cel-python
  when it is installed (transition rules, which use `oldSelf`, only apply to updates and are skipped).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

try:
    import celpy
except ImportError:  # pragma: no cover - cel-python is in the dev extra
    celpy = None

Obj = dict[str, Any]
OBJECT_META_REF = (
    "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
)


def group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _format(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"


# --- core kinds ---------------------------------------------------------------------------------------------


class CoreSchemas:
    """Validators for built-in kinds of one Kubernetes minor version, from kubernetes-validate's files."""

    def __init__(self, k8s_version: str) -> None:
        root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
        self.version = k8s_version
        self._dir = root / f"v{k8s_version}.0-local-strict"
        if not self._dir.is_dir():
            available = sorted(p.name for p in root.iterdir())
            raise LookupError(f"kubernetes-validate has no schemas for {k8s_version}: {available}")
        definitions = json.loads((self._dir / "_definitions.json").read_text())
        self.registry: Registry = Resource.from_contents(definitions) @ Registry()
        self._validators: dict[str, jsonschema.protocols.Validator | None] = {}
        self._object_meta = jsonschema.Draft202012Validator({"$ref": OBJECT_META_REF}, registry=self.registry)

    def _validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
        group, version = group_version(api_version)
        prefix = group.split(".")[0]
        name = f"{kind.lower()}-{prefix}-{version}.json" if group else f"{kind.lower()}-{version}.json"
        if name not in self._validators:
            path = self._dir / name
            schema = json.loads(path.read_text()) if path.is_file() else None
            self._validators[name] = (
                None if schema is None else jsonschema.Draft202012Validator(schema, registry=self.registry)
            )
        return self._validators[name]

    def knows(self, obj: Mapping[str, Any]) -> bool:
        return self._validator(obj["apiVersion"], obj["kind"]) is not None

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        validator = self._validator(obj["apiVersion"], obj["kind"])
        if validator is None:
            return [f"no Kubernetes {self.version} schema for {obj['apiVersion']} {obj['kind']}"]
        return sorted(_format(e) for e in validator.iter_errors(obj))

    def object_meta_errors(self, metadata: Any) -> list[str]:
        return sorted(f"metadata.{_format(e)}" for e in self._object_meta.iter_errors(metadata))


# --- custom resources ---------------------------------------------------------------------------------------


def structural_to_json_schema(node: Mapping[str, Any], *, in_junctor: bool = False) -> dict[str, Any]:
    """One node of a CRD's structural openAPIV3Schema → JSON Schema (draft 4 keywords, as OpenAPI v3.0),
    with unknown fields forbidden where the API server's strict field validation forbids them."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural_to_json_schema(value)
        elif key == "additionalProperties":
            out[key] = structural_to_json_schema(value) if isinstance(value, Mapping) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [structural_to_json_schema(sub, in_junctor=True) for sub in value]
        elif key == "not":
            out[key] = structural_to_json_schema(value, in_junctor=True)
        elif key.startswith("x-kubernetes-") or key in ("description", "default", "nullable", "example"):
            continue  # handled below, applied beforehand (default) or documentation only
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    is_object = node.get("type") == "object" or "properties" in node
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if is_object and not in_junctor and not preserve and "additionalProperties" not in node:
        if node.get("x-kubernetes-embedded-resource"):
            props = out.setdefault("properties", {})
            for implicit in ("apiVersion", "kind", "metadata"):
                props.setdefault(implicit, {})
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: Mapping[str, Any], value: Any) -> None:
    """Fill in schema defaults in place, as the API server does before it validates."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in value.keys() - props.keys():
                apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            apply_defaults(schema["items"], item)


def list_type_errors(schema: Mapping[str, Any], value: Any, path: str = "") -> Iterator[str]:
    """x-kubernetes-list-type: map (keys unique) and set (items unique), checked recursively."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, item in value.items():
            sub = props.get(name, schema.get("additionalProperties"))
            if isinstance(sub, Mapping):
                yield from list_type_errors(sub, item, f"{path}.{name}" if path else name)
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(json.dumps(item.get(k), sort_keys=True) for k in keys) for item in value]
            if len(seen) != len(set(seen)):
                yield f"{path}: duplicate entries for list-map keys {keys}"
        elif list_type == "set":
            seen_items = [json.dumps(item, sort_keys=True) for item in value]
            if len(seen_items) != len(set(seen_items)):
                yield f"{path}: duplicate items in a list of type set"
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                yield from list_type_errors(items, item, f"{path}[{index}]")


class CELRules:
    """Evaluates a schema's x-kubernetes-validations rules where the object has a value, like the API server
    does on create. A rule cel-python cannot compile or run is reported as an error, not skipped."""

    def __init__(self) -> None:
        if celpy is None:
            raise RuntimeError("cel-python is not installed")
        self.env = celpy.Environment()
        self._programs: dict[str, Any] = {}
        self.evaluated = 0

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self.env.program(self.env.compile(rule))
        return self._programs[rule]

    def errors(self, schema: Mapping[str, Any], value: Any, path: str = "") -> Iterator[str]:
        for validation in schema.get("x-kubernetes-validations", ()):
            rule = validation["rule"]
            if "oldSelf" in rule:
                continue  # transition rule: only evaluated on update
            try:
                result = self._program(rule).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as err:  # any failure to evaluate is a finding, not a skip
                yield f"{path or '(root)'}: CEL rule could not be evaluated ({err!r}): {rule}"
                continue
            self.evaluated += 1
            if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
                yield f"{path or '(root)'}: {validation.get('message', 'CEL rule failed')} [{rule}]"
        if isinstance(value, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for name, item in value.items():
                sub = props.get(name, extra if isinstance(extra, Mapping) else None)
                if sub is not None:
                    yield from self.errors(sub, item, f"{path}.{name}" if path else name)
        elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
            for index, item in enumerate(value):
                yield from self.errors(schema["items"], item, f"{path}[{index}]")


class CRD:
    def __init__(self, doc: Mapping[str, Any], source: Path) -> None:
        spec = doc["spec"]
        self.source = source
        self.group: str = spec["group"]
        self.kind: str = spec["names"]["kind"]
        self.scope: str = spec["scope"]
        self.versions: dict[str, Mapping[str, Any]] = {
            v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served", True)
        }
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    def validator(self, version: str) -> jsonschema.protocols.Validator:
        if version not in self._validators:
            schema = structural_to_json_schema(self.versions[version])
            schema["properties"]["metadata"] = {"type": "object"}  # checked as ObjectMeta separately
            self._validators[version] = jsonschema.Draft4Validator(schema)
        return self._validators[version]


class CRDSchemas:
    """Custom resources of the CRDs in a directory, validated like the API server validates them."""

    def __init__(self, crd_dir: Path, object_meta: CoreSchemas, cel: CELRules | None = None) -> None:
        self.crds: dict[tuple[str, str], CRD] = {}
        self.object_meta = object_meta
        self.cel = cel
        for path in sorted(crd_dir.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    crd = CRD(doc, path)
                    self.crds[(crd.group, crd.kind)] = crd

    def crd_for(self, obj: Mapping[str, Any]) -> CRD | None:
        group, _ = group_version(obj["apiVersion"])
        return self.crds.get((group, obj["kind"]))

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        crd = self.crd_for(obj)
        if crd is None:
            return [f"no CRD for {obj['apiVersion']} {obj['kind']} in the fixtures"]
        _, version = group_version(obj["apiVersion"])
        if version not in crd.versions:
            return [f"{crd.kind} has no served version {version} (served: {sorted(crd.versions)})"]
        schema = crd.versions[version]
        defaulted = copy.deepcopy(dict(obj))
        metadata = defaulted.pop("metadata", None)
        apply_defaults(schema, defaulted)
        defaulted["metadata"] = metadata
        found = [_format(e) for e in crd.validator(version).iter_errors(defaulted)]
        found += list_type_errors(schema, defaulted)
        if self.cel is not None:
            without_metadata = {k: v for k, v in defaulted.items() if k != "metadata"}
            found += self.cel.errors(schema, without_metadata)
        found += self.object_meta.object_meta_errors(metadata)
        return sorted(found)
