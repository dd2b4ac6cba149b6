"""values.schema.json rejects unknown keys and bad types; values.yaml documents every key."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
BAD = sorted((pathlib.Path(__file__).parent / "bad-values").glob("*.yaml"))
# What helm must say for each bad file (a fragment of the schema error).
EXPECTED = {
    "typo-top-level.yaml": "prometheusRules",
    "typo-nested.yaml": "watchNamespace",
    "wrong-type.yaml": "boolean",
    "bad-port.yaml": "maximum",
    "bad-threshold.yaml": "maximum",
    "bad-namespace.yaml": "Team_A",
}


def test_every_bad_file_has_an_expectation():
    assert {p.name for p in BAD} == set(EXPECTED)


@pytest.mark.parametrize("bad", BAD, ids=[p.name for p in BAD])
def test_bad_values_are_rejected(helm, bad):
    for args in (["template", "pt", str(CHART), "-f", str(bad)], ["lint", str(CHART), "-f", str(bad)]):
        out = helm(*args)
        assert out.returncode != 0, f"helm {args[0]} accepted {bad.name}"
        text = out.stdout + out.stderr
        assert "schema" in text.lower() and EXPECTED[bad.name] in text, text


def test_set_typo_is_rejected(helm):
    out = helm("template", "pt", str(CHART), "--set", "operator.imagee.tag=1")
    assert out.returncode != 0 and "imagee" in out.stderr


def _leaves(schema: dict, prefix: str = ""):
    props = schema.get("properties")
    if not props:
        yield prefix
        return
    for key, sub in props.items():
        yield from _leaves(sub, f"{prefix}.{key}" if prefix else key)


def test_schema_is_closed_everywhere():
    OPEN = {"$.properties.operator.properties.env.items"}  # a Kubernetes EnvVar (valueFrom, ...)
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path="$"):
        if isinstance(node, dict):
            if "properties" in node and path not in OPEN:
                assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in node.items():
                walk(v, f"{path}.{k}")

    walk(schema)


def test_schema_and_values_cover_the_same_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else k
            yield path
            if isinstance(v, dict) and v and path not in FREE_FORM:
                yield from keys(v, path)

    FREE_FORM = {"operator.resources", "operator.podSecurityContext", "operator.securityContext"}
    value_keys = set(keys(values))
    schema_keys = set()

    def skeys(node, prefix=""):
        for k, v in node.get("properties", {}).items():
            path = f"{prefix}.{k}" if prefix else k
            schema_keys.add(path)
            if path not in FREE_FORM:
                skeys(v, path)

    skeys(schema)
    assert value_keys <= schema_keys
    missing = {k for k in schema_keys - value_keys if not k.startswith(tuple(f"{f}." for f in FREE_FORM))}
    assert not {k for k in missing if not k.split(".")[-1] in {"requests", "limits", "initialDelaySeconds",
                                                                  "successThreshold"}}, missing


def test_every_value_is_documented():
    """Every key in values.yaml has a comment above it, or sits inside a documented parent block."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def indent(line):
        return len(line) - len(line.lstrip())

    def documented(i):
        if i and lines[i - 1].strip().startswith("#"):
            return True
        parent = next((j for j in range(i - 1, -1, -1)
                       if lines[j].strip() and not lines[j].strip().startswith("#") and indent(lines[j]) < indent(lines[i])),
                      None)
        return parent is not None and documented(parent)

    for i, line in enumerate(lines):
        m = re.match(r"^\s*([A-Za-z][\w]*):\s*(\S.*)?$", line)
        if m and m.group(2):  # a key with an inline value (leaf)
            assert documented(i), f"values.yaml:{i + 1} `{line.strip()}` has no comment"
