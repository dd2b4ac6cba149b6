"""The CRD: generated file in sync, valid as a Kubernetes object, and its schema applied to examples."""

from __future__ import annotations

import copy
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pageant.operator import cli, schema, spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "pageant.dev_inferenceservices.yaml"


def test_crd_file_matches_code():
    assert CRD_FILE.read_text() == cli.crd_yaml(), "crds/ drifted: regenerate with `pageant crd > crds/...`"


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), "1.33", strict=True)


def test_crd_shape():
    crd = schema.crd()
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["shortNames"], crd["spec"]["scope"]) == (
        "pageant.dev", "InferenceService", ["infsvc"], "Namespaced")
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.name" and columns["URL"] == ".status.url"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert {"Ready-Replicas", "Desired", "Ready"} <= set(columns)
    rules = [r["rule"] for r in version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
             ["autoscaling"]["x-kubernetes-validations"]]
    assert schema.RULE_MIN_LE_MAX in rules


def _structural_problems(node, path="") -> list[str]:
    """Every schema node must have a type (or be int-or-string / preserve-unknown-fields)."""
    problems = []
    if not isinstance(node, dict):
        return problems
    if "type" not in node and not node.get("x-kubernetes-int-or-string") \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(path or "/")
    for key, sub in (node.get("properties") or {}).items():
        problems += _structural_problems(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        problems += _structural_problems(node["items"], f"{path}[]")
    for key in ("oneOf", "anyOf", "allOf"):
        for sub in node.get(key, []):
            if node.get("x-kubernetes-int-or-string"):
                continue
            assert "type" not in sub and "properties" not in sub, f"{path}: {key} must not set types"
    return problems


def test_schema_is_structural():
    assert _structural_problems(schema.openapi_schema()) == []


def test_examples_pass_the_crd_schema_and_python_rules(examples, our_validator):
    assert set(examples) >= {"hub-model.yaml", "pvc-model-with-adapters.yaml", "keda-scale-to-zero.yaml",
                             "gateway-routed.yaml"}
    for name, body in examples.items():
        our_validator.validate(body)
        spec.parse(body)  # the CEL rules, re-checked in Python


@pytest.mark.parametrize("mutate,fragment", [
    (lambda s: s["model"].update(pvc={"claimName": "w"}), "model"),          # two sources
    (lambda s: s["model"].pop("hub"), "model"),                                # no source
    (lambda s: s["model"].update(demo={}), "model"),                           # hub and demo
    (lambda s: s.update(engine={"dtype": "int3"}), "dtype"),                   # enum
    (lambda s: s.update(engine={"gpuMemoryUtilization": 0}), "gpuMemoryUtilization"),  # exclusive range
    (lambda s: s.update(engine={"gpuMemoryUtilization": 1.5}), "gpuMemoryUtilization"),
    (lambda s: s.update(replicas=-1), "replicas"),
    (lambda s: s.update(autoscaling={"minReplicas": 1}), "maxReplicas"),       # required
    (lambda s: s.update(adapters=[{"name": "a"}]), "adapters"),               # adapter without source
    (lambda s: s.update(autoscaling={"maxReplicas": 2, "provider": "knative"}), "provider"),
])
def test_schema_and_parser_reject_the_same_bad_specs(make_body, our_validator, mutate, fragment):
    body = make_body()
    mutate(body["spec"])
    with pytest.raises(jsonschema.ValidationError):
        our_validator.validate(body)
    with pytest.raises(spec.InvalidSpec) as info:
        spec.parse(body)
    assert fragment in str(info.value)


def _cel_min_le_max(autoscaling: dict) -> bool:
    """schema.RULE_MIN_LE_MAX evaluated by hand (with the CRD's default minReplicas 1)."""
    return autoscaling.get("minReplicas", 1) <= autoscaling["maxReplicas"]


@pytest.mark.parametrize("auto", [{"minReplicas": 3, "maxReplicas": 2}, {"minReplicas": 0, "maxReplicas": 1},
                                  {"maxReplicas": 1}, {"minReplicas": 2, "maxReplicas": 2}])
def test_cel_min_le_max_matches_the_parser(make_body, our_validator, auto):
    assert schema.RULE_MIN_LE_MAX == "self.minReplicas <= self.maxReplicas"
    body = make_body(autoscaling=copy.deepcopy(auto))
    our_validator.validate(body)  # structurally fine either way: only CEL can compare two fields
    if _cel_min_le_max(auto):
        assert spec.parse(body).autoscaling.max_replicas == auto["maxReplicas"]
    else:
        with pytest.raises(spec.InvalidSpec, match="minReplicas must be <= maxReplicas"):
            spec.parse(body)


def test_parser_cross_field_rules(make_body):
    with pytest.raises(spec.InvalidSpec, match="hpa provider cannot scale to zero"):
        spec.parse(make_body(autoscaling={"provider": "hpa", "minReplicas": 0, "maxReplicas": 2}))
    with pytest.raises(spec.InvalidSpec, match="Custom needs a query"):
        spec.parse(make_body(autoscaling={"metric": "Custom", "maxReplicas": 2}))
    with pytest.raises(spec.InvalidSpec, match="within"):
        spec.parse(make_body(replicas=5, autoscaling={"maxReplicas": 2}))
    with pytest.raises(spec.InvalidSpec, match="'..'"):
        spec.parse(make_body(model={"name": "m", "pvc": {"claimName": "w", "path": "../etc"}}))
    with pytest.raises(spec.InvalidSpec, match="duplicate adapter"):
        spec.parse(make_body(adapters=[{"name": "a", "hub": {"repo": "o/a"}}, {"name": "a", "hub": {"repo": "o/b"}}]))
    with pytest.raises(spec.InvalidSpec, match="served model's name"):
        spec.parse(make_body(adapters=[{"name": "tiny", "hub": {"repo": "o/a"}}]))
    with pytest.raises(spec.InvalidSpec, match="tensorParallelSize"):
        spec.parse(make_body(engine={"tensorParallelSize": 4}, resources={"gpus": 2}))
