"""The CRD's CEL rules (x-kubernetes-validations), evaluated for real with cel-python, after the
API server's defaulting; the Python parser (spec.parse) must agree with them case by case."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import celpy
import pytest

from pageant.operator import schema, spec


def _defaulted(node: dict[str, Any], value: Any) -> Any:
    """Structural-schema defaulting, as the API server does before validation."""
    if isinstance(value, dict) and node.get("type") == "object":
        value = dict(value)
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _defaulted(sub, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [_defaulted(node["items"], v) for v in value]
    return value


def _rules(node: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(path, rule, message, self) for every CEL rule that applies to a value."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path or "/", rule["rule"], rule["message"], value
    if isinstance(value, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key in value:
                yield from _rules(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, v in enumerate(value):
            yield from _rules(node["items"], v, f"{path}[{i}]")


def cel_violations(body: dict[str, Any]) -> list[str]:
    root = schema.openapi_schema()
    env = celpy.Environment()
    obj = _defaulted(root, body)
    out = []
    for path, rule, message, value in _rules(root, obj):
        result = env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)})
        if not bool(result):
            out.append(f"{path}: {message}")
    return out


def test_every_rule_compiles():
    rules = [r for _, r, _, _ in _rules(schema.openapi_schema(), _defaulted(schema.openapi_schema(), {
        "spec": {"model": {"name": "m", "pvc": {"claimName": "c"}}, "autoscaling": {"maxReplicas": 1},
                 "adapters": [{"name": "a", "pvc": {"claimName": "c"}}]}}))]
    assert len(rules) >= 7
    env = celpy.Environment()
    for rule in rules:
        env.compile(rule)


def test_examples_pass_the_cel_rules(examples):
    for name, body in examples.items():
        assert cel_violations(body) == [], name


CASES = [
    ({"autoscaling": {"minReplicas": 3, "maxReplicas": 1}}, "minReplicas must be <= maxReplicas"),
    ({"autoscaling": {"minReplicas": 2, "maxReplicas": 2}}, None),
    ({"autoscaling": {"maxReplicas": 1}}, None),                        # default minReplicas 1
    ({"autoscaling": {"minReplicas": 0, "maxReplicas": 1}}, None),      # scale to zero with keda
    ({"autoscaling": {"provider": "hpa", "minReplicas": 0, "maxReplicas": 2}}, "cannot scale to zero"),
    ({"autoscaling": {"metric": "Custom", "maxReplicas": 2}}, "Custom needs a query"),
    ({"autoscaling": {"metric": "Custom", "query": "sum(up)", "maxReplicas": 2}}, None),
    ({"autoscaling": {"provider": "hpa", "metric": "Custom", "maxReplicas": 2}}, "needs hpaMetricName"),
    ({"replicas": 5, "autoscaling": {"maxReplicas": 2}}, "within"),
    ({"replicas": 2, "autoscaling": {"maxReplicas": 2}}, None),
    ({"model": {"name": "m", "pvc": {"claimName": "w", "path": "../x"}}}, "'..'"),
    ({"model": {"name": "m", "pvc": {"claimName": "w", "path": "a/b"}}}, None),
    ({"model": {"name": "m", "hub": {"repo": "o/m"}, "pvc": {"claimName": "w"}}}, "exactly one model source"),
    ({"model": {"name": "m", "hub": {"repo": "o/m"}, "demo": {}}}, "exactly one model source"),
    ({"model": {"name": "m", "demo": {}}, "resources": {"gpus": 0}}, None),
    ({"adapters": [{"name": "a", "pvc": {"claimName": "w", "path": "x/../../y"}}]}, "'..'"),
]


@pytest.mark.parametrize("spec_patch,error", CASES)
def test_cel_and_the_python_parser_agree(make_body, spec_patch, error):
    body = make_body(**spec_patch)
    violations = cel_violations(body)
    if error is None:
        assert violations == []
        spec.parse(body)
    else:
        assert any(error in v for v in violations), violations
        with pytest.raises(spec.InvalidSpec):
            spec.parse(body)
