"""Fixtures for the Helm chart tests: the real `helm` binary, rendering, and strict validation.

Kubernetes built-in kinds are validated with kubernetes-validate (strict, 1.33); Prometheus
Operator kinds (ServiceMonitor, PodMonitor, PrometheusRule) with the openAPIV3Schema of the
upstream CRDs in PAGEANT_SCHEMAS_DIR, made strict (unknown fields rejected) the way the API server's
strict field validation does.
"""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import require_helm, require_schemas_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
K8S_VERSION = "1.33"


@pytest.fixture(scope="session")
def helm() -> Callable[..., subprocess.CompletedProcess]:
    """Run `helm ARGS...`; returns the CompletedProcess (never raises on a non-zero exit)."""
    binary = require_helm()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., list[dict[str, Any]]]:
    """`helm template` the chart with values files / --set flags; returns the objects (source on `_source`)."""

    def _render(*values_files: pathlib.Path | str, set_: tuple[str, ...] = (), namespace: str = "pageant-system",
                raw: bool = False):
        args = ["template", "pt", str(CHART), "--namespace", namespace]
        for f in values_files:
            args += ["-f", str(f)]
        for s in set_:
            args += ["--set", s]
        out = helm(*args)
        assert out.returncode == 0, out.stderr
        if raw:
            return out.stdout
        return parse_rendered(out.stdout)

    return _render


def parse_rendered(text: str) -> list[dict[str, Any]]:
    objs = []
    for doc in text.split("\n---\n"):
        source = next((line.split("# Source: ", 1)[1] for line in doc.splitlines() if line.startswith("# Source: ")), None)
        obj = yaml.safe_load(doc)
        if obj:
            obj["_source"] = source
            objs.append(obj)
    return objs


def _strict(schema: Any) -> Any:
    """Reject unknown fields where the structural schema lists the properties."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a jsonschema validator built from the upstream CRDs."""
    validators = {}
    folder = require_schemas_dir()
    for path in sorted(folder.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


@pytest.fixture(scope="session")
def validate_object(crd_validators) -> Callable[[dict[str, Any]], None]:
    """Validate one rendered object strictly; raises AssertionError with the reasons."""

    def _validate(obj: dict[str, Any]) -> None:
        obj = {k: v for k, v in obj.items() if k != "_source"}
        key = (obj["apiVersion"], obj["kind"])
        if obj["apiVersion"].split("/")[0].endswith(("monitoring.coreos.com", "keda.sh")):
            assert key in crd_validators, f"no upstream schema for {key}"
            errors = sorted(crd_validators[key].iter_errors(obj), key=str)
            assert not errors, f"{key} {obj['metadata']['name']}: " + "; ".join(e.message for e in errors[:5])
            return
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{key} {obj['metadata'].get('name')}: {exc.message} at {list(exc.path)}") from exc

    return _validate
