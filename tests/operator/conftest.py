"""Shared fixtures for the operator tests: spec factories and schema validators."""

from __future__ import annotations

import copy
import pathlib
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import require_schemas_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33"
UPSTREAM = {  # (apiVersion, kind) -> file under PAGEANT_SCHEMAS_DIR
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("http.keda.sh/v1beta1", "InterceptorRoute"): "http.keda.sh_interceptorroutes.yaml",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
}


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.Draft4Validator:
    """A jsonschema validator for one version of a CRD's openAPIV3Schema (OpenAPI 3.0 ~ draft 4:
    boolean exclusiveMinimum; x-kubernetes-* keywords are ignored by jsonschema)."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return jsonschema.Draft4Validator(v["schema"]["openAPIV3Schema"])
    raise KeyError(version)


@pytest.fixture(scope="session")
def upstream_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    out = {}
    folder = require_schemas_dir(*UPSTREAM.values())
    for (api_version, kind), filename in UPSTREAM.items():
        path = folder / filename
        crd = yaml.safe_load(path.read_text())
        assert crd["spec"]["names"]["kind"] == kind
        out[(api_version, kind)] = crd_validator(crd, api_version.split("/")[1])
    return out


@pytest.fixture(scope="session")
def validate_manifest(upstream_validators) -> Callable[[dict[str, Any]], None]:
    """Validate a rendered object: core kinds with kubernetes-validate (strict, 1.33); KEDA (and its
    HTTP add-on), Prometheus Operator, Gateway API, Inference Extension and LeaderWorkerSet kinds
    with their published CRD schemas. A LeaderWorkerSet's pod templates are also validated strictly
    as core PodTemplates (its CRD schema does not reject unknown fields)."""

    def validate(obj: dict[str, Any]) -> None:
        key = (obj["apiVersion"], obj["kind"])
        if key in upstream_validators:
            upstream_validators[key].validate(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            for role in ("leaderTemplate", "workerTemplate"):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {
                    "name": f"{obj['metadata']['name']}-{role}"}, "template": lwt[role]}, K8S_VERSION, strict=True)

    return validate


@pytest.fixture(scope="session")
def our_validator() -> jsonschema.Draft4Validator:
    from pageant.operator import schema

    return crd_validator(schema.crd(), schema.VERSION)


BASE = {
    "apiVersion": "pageant.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "demo", "namespace": "ml", "uid": "0b7c3f0e-1111-4222-8333-444455556666", "generation": 1},
    "spec": {"model": {"name": "tiny", "hub": {"repo": "org/tiny-model"}}},
}


@pytest.fixture
def make_body() -> Callable[..., dict[str, Any]]:
    """make_body(**spec_overrides) -> an InferenceService dict (deep-copied)."""

    def make(**spec: Any) -> dict[str, Any]:
        body = copy.deepcopy(BASE)
        body["spec"].update(copy.deepcopy(spec))
        return body

    return make


@pytest.fixture
def examples() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))}

