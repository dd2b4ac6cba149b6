"""The InferenceService examples in the README and NOTES.txt are valid: they pass the CRD's
schema and the operator's own spec parser (which also checks the CEL rules)."""

from __future__ import annotations

import copy
import pathlib
import re

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
BASE = {"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "qwen", "namespace": "default"},
        "spec": {"model": {"name": "qwen", "hub": {"repo": "Qwen/Qwen2.5-0.5B-Instruct"}}}}


def _crd_validator():
    crd = yaml.safe_load((ROOT / "crds" / "pageant.dev_inferenceservices.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _readme_examples() -> list[tuple[str, dict]]:
    """Every YAML block of the README that is an InferenceService or a `spec:` fragment of one."""
    out = []
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)):
        doc = yaml.safe_load(block)
        if doc.get("kind") == "InferenceService":
            out.append((f"README block {i}", doc))
        elif set(doc) == {"spec"}:
            out.append((f"README block {i} (spec fragment)", _merge(BASE, doc)))
    return out


def _notes_example(helm) -> dict:
    """Run the NOTES' `kubectl apply ... <<'YAML'` command as pasted into bash (kubectl replaced by
    `cat`): the heredoc must be well-formed and give the InferenceService."""
    import subprocess

    out = helm("install", "pt", str(CHART), "--dry-run=client", "--namespace", "pageant-system")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    start = notes.index("kubectl apply -n default -f - <<'YAML'")
    command = notes[start:notes.index("\nYAML\n", start) + len("\nYAML\n")]
    run = subprocess.run(["bash", "-c", "kubectl() { cat; }\n" + command], capture_output=True, text=True)
    assert run.returncode == 0 and not run.stderr, run.stderr
    return yaml.safe_load(run.stdout)


def test_readme_has_the_examples():
    names = [n for n, _ in _readme_examples()]
    assert len(names) >= 3, names  # first InferenceService, autoscaling, adapters


@pytest.mark.parametrize("name,doc", _readme_examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_examples_are_valid(name, doc):
    from pageant.operator import spec

    errors = [e.message for e in _crd_validator().iter_errors(doc)]
    assert not errors, (name, errors)
    spec.parse(doc)  # raises InvalidSpec with the problems


def test_notes_example_is_valid(helm):
    from pageant.operator import spec

    doc = _notes_example(helm)
    assert doc["kind"] == "InferenceService"
    assert not [e.message for e in _crd_validator().iter_errors(doc)]
    parsed = spec.parse(doc)
    assert parsed.model.name == "qwen"
