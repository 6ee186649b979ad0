"""Validators for Kubernetes manifests: CRD kinds against their CRD's openAPIV3Schema (jsonschema), core kinds
against Kubernetes' own OpenAPI schemas (the kubernetes-validate package). Unknown fields are errors, as with
`kubectl apply --validate=strict` (the default since Kubernetes 1.27)."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
UPSTREAM = K8S / "schemas"  # upstream CRDs (KEDA, Gateway API, Envoy Gateway)
OURS = K8S / "crds"
SHARED = REPO.parent / "shared" / "schemas"
KUBE_VERSION = "1.33"  # the oldest Kubernetes the manifests are written for (grpc probes, appProtocol h2c)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if UPSTREAM not in p.parents)


def strict(schema: Any) -> Any:
    """Objects with declared properties take no others (unless the schema preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD we know."""
    out = {}
    for path in sorted(UPSTREAM.glob("*.yaml")) + sorted(OURS.glob("*.yaml")):
        for crd in load_all(path):
            assert crd["kind"] == "CustomResourceDefinition", path
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served", True):
                    out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


@lru_cache(maxsize=None)
def _validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = strict(copy.deepcopy(crd_schemas()[(api_version, kind)]))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(doc: dict) -> list[str]:
    """Problems with one manifest document ([] when it is valid)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crd_schemas():
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in _validator(*key).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema: {e.message}"]
    return []


def validate(doc: dict) -> None:
    problems = errors(doc)
    assert not problems, f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: " + "; ".join(problems)
