"""`pageant operator render` refuses unknown and duplicate fields, as `kubectl apply` (strict field
validation) does, naming each by its path; the check agrees with the CRD's own schema made strict."""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from pageant.operator import schema, strict

ROOT = pathlib.Path(__file__).resolve().parents[2]

# every object the schema describes, filled in (the body the injection test walks)
FULL_SPEC = {
    "model": {"name": "m", "cache": {"repo": "org/m", "revision": "v1", "size": "40Gi", "storageClassName": "fast",
                                     "accessMode": "ReadWriteOnce", "tokenSecretRef": {"name": "hf", "key": "t"}}},
    "engine": {"image": "reg/e:1", "maxLoras": 2, "apiKeySecretRef": {"name": "k"}, "extraArgs": ["--x"],
               "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
    "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
    "scheduling": {"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "k", "operator": "Exists"}],
                   "affinity": {"nodeAffinity": {"anything": {"goes": True}}}},
    "replicas": 2,
    "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
    "adapters": [{"name": "a", "pvc": {"claimName": "loras", "path": "a"}},
                 {"name": "b", "hub": {"repo": "o/b", "tokenSecretRef": {"name": "hf"}}}],
    "monitoring": {"kind": "PodMonitor", "labels": {"release": "prom"}},
    "networkPolicy": {"enabled": True},
    "serviceAccountName": "sa",
}


def _body(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "demo", "namespace": "ml", **meta}, "spec": copy.deepcopy(spec or FULL_SPEC)}


def _strict_schema(node: Any) -> Any:
    """The schema as the API server's strict field validation reads it: objects that list their
    properties (and do not preserve unknown fields) reject any other."""
    if isinstance(node, dict):
        out = {k: _strict_schema(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict_schema(x) for x in node]
    return node


STRICT = jsonschema.Draft4Validator(_strict_schema(schema.openapi_schema()))


def _object_paths(value: Any, node: dict[str, Any], path: str = "") -> list[tuple[list, str]]:
    """(key path, dotted path) of every dict in ``value`` whose schema lists its properties."""
    out = []
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(value, dict) and "properties" in node:
        out.append(([], path))
        for key, sub in value.items():
            if key in node["properties"]:
                out += [([key, *keys], p) for keys, p in _object_paths(sub, node["properties"][key],
                                                                        f"{path}.{key}" if path else key)]
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            out += [([i, *keys], p) for keys, p in _object_paths(item, node["items"], f"{path}[{i}]")]
    return out


def test_the_full_body_is_valid_and_has_no_unknown_fields():
    body = _body()
    assert strict.problems(body) == []
    STRICT.validate(body)


def test_an_unknown_field_anywhere_is_named_by_its_path():
    body = _body()
    paths = _object_paths(body, schema.openapi_schema())
    assert len(paths) >= 20, [p for _, p in paths]
    for keys, path in paths:
        bad = copy.deepcopy(body)
        target = bad
        for key in keys:
            target = target[key]
        target["zzz"] = 1
        expected = f"{path}.zzz" if path else "zzz"
        assert strict.problems(bad) == [f'unknown field "{expected}"'], path
        with pytest.raises(jsonschema.ValidationError):  # the CRD's schema, made strict, agrees
            STRICT.validate(bad)


def test_free_form_fields_and_maps_accept_any_key():
    body = _body()
    body["spec"]["scheduling"]["affinity"]["podAntiAffinity"] = {"x": 1}      # preserve-unknown-fields
    body["spec"]["engine"]["env"][1]["valueFrom"]["configMapKeyRef"] = {"name": "c", "key": "k"}
    body["spec"]["scheduling"]["nodeSelector"]["any-label"] = "x"            # additionalProperties: string
    body["status"] = {"readyReplicas": 1}
    assert strict.problems(body) == []


def test_metadata_is_checked_as_object_meta():
    assert strict.problems(_body(labels={"a": "b"}, annotations={}, uid="u", generation=1)) == []
    assert strict.problems(_body(nmae="x")) == ['unknown field "metadata.nmae"']


def _render(text: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", "-", *flags],
                          input=text, capture_output=True, text=True, timeout=60)


MISSPELLED = """\
apiVersion: pageant.dev/v1alpha1
kind: InferenceService
metadata:
  name: qwen
spec:
  model:
    name: qwen
    hub: {repo: Qwen/Qwen2.5-0.5B-Instruct, revison: main}
  replica: 3
  adapters:
    - name: a
      hub: {repo: o/a}
      nmae: b
"""


def test_render_refuses_misspelled_fields():
    out = _render(MISSPELLED)
    assert out.returncode == 2, out.stderr
    assert not out.stdout
    for path in ("spec.replica", "spec.model.hub.revison", "spec.adapters[0].nmae"):
        assert f'unknown field "{path}"' in out.stderr, out.stderr
    assert "InferenceService 'qwen'" in out.stderr


def test_render_refuses_duplicate_fields():
    text = "apiVersion: pageant.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: q}\n" \
           "spec:\n  model: {name: q, hub: {repo: o/q}}\n  replicas: 1\n  replicas: 3\n"
    out = _render(text)
    assert out.returncode == 2 and 'line 7: duplicate field "replicas"' in out.stderr, out.stderr


@pytest.mark.parametrize("flag,warned", [("--validate=warn", True), ("--validate=ignore", False),
                                         ("--validate=false", False)])
def test_render_can_warn_or_ignore(flag, warned):
    out = _render(MISSPELLED, flag)
    assert out.returncode == 0, out.stderr
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1  # what the misspelling costs
    assert ('warning' in out.stderr and 'unknown field "spec.replica"' in out.stderr) is warned
    assert bool(out.stderr) is warned


def test_render_strict_passes_clean_files_and_skips_other_kinds():
    docs = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"},
             "whatever": True}, _body()]
    out = _render(yaml.safe_dump_all(docs))
    assert out.returncode == 0 and not out.stderr, out.stderr


def test_examples_have_no_unknown_or_duplicate_fields():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs, duplicates = strict.load_all(path.read_text())
        assert duplicates == [], path.name
        for doc in docs:
            assert strict.problems(doc) == [], path.name


def test_load_all_matches_safe_load_all():
    text = "a: 1\nb: {c: [1, 2]}\n---\n---\nx: &anchor {k: v}\ny:\n  <<: *anchor\n  k: w\n"
    docs, duplicates = strict.load_all(text)
    assert docs == [d for d in yaml.safe_load_all(text) if d is not None] and duplicates == []


def test_the_demo_source_takes_no_fields():
    assert strict.problems(_body({"model": {"name": "m", "demo": {}}})) == []
    assert strict.problems(_body({"model": {"name": "m", "demo": {"size": "1"}}})) == [
        'unknown field "spec.model.demo.size"']
