"""The README's CPU quick start ("Trying it without a GPU (kind)") holds together without a cluster:
its commands name files that exist, build and load the very images the chart and the example use,
install the chart as written (`helm template` with the same flags), and the example InferenceService
renders (`pageant operator render`) into objects that pass strict Kubernetes validation; the
port-forward, curl and OpenAI-client lines target that example's Service and model."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADING = "### Trying it without a GPU (kind)"
EXAMPLE = "examples/demo-cpu.yaml"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} subsection"
    start = text.index(HEADING)
    end = text.find("\n### ", start + len(HEADING))
    section = text[start:end if end != -1 else len(text)]
    assert text.rfind("\n## ", 0, start) == text.find("\n## On Kubernetes"), "the quick start is under 'On Kubernetes'"
    return section


@pytest.fixture(scope="module")
def commands() -> list[list[str]]:
    """The quick start's first bash block, one word list per command (continuations joined)."""
    block = re.search(r"```bash\n(.*?)```", _section(), re.S)
    assert block, "the quick start has no bash block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in commands if c[:len(prefix)] == list(prefix)]


def _one(commands: list[list[str]], *prefix: str) -> list[str]:
    found = _find(commands, *prefix)
    assert len(found) == 1, (prefix, found)
    return found[0]


def _opt(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


@pytest.fixture(scope="module")
def example() -> dict:
    return yaml.safe_load((ROOT / EXAMPLE).read_text())


def test_the_commands_run_in_order_from_kind_to_an_answer(commands):
    firsts = [" ".join(c[:2]) for c in commands]
    order = ["kind create", "docker build", "kind load", "helm install", "kubectl apply", "kubectl wait",
             "kubectl port-forward", "curl -s", "python examples/openai_client.py"]
    positions = [next(i for i, f in enumerate(firsts) if f == step) for step in order]
    assert positions == sorted(positions), firsts
    assert commands[0][:3] == ["kind", "create", "cluster"]


def test_every_file_the_commands_name_exists(commands):
    paths = [w for c in commands for w in c if re.match(r"^(\./)?(images|examples|charts)/", w)]
    assert {"images/engine-cpu.Dockerfile", "images/operator.Dockerfile", "./charts/pageant", EXAMPLE,
            "examples/openai_client.py"} <= set(paths)
    for path in paths:
        assert (ROOT / path).exists(), path
    for build in _find(commands, "docker", "build"):
        assert build[-1] == ".", "the build context is the repository root"
        assert (ROOT / _opt(build, "-f")).is_file()


def test_the_built_images_are_loaded_and_used(commands, example, helm):
    cluster = _opt(_one(commands, "kind", "create", "cluster"), "--name")
    load = _one(commands, "kind", "load", "docker-image")
    assert _opt(load, "--name") == cluster
    built = {_opt(b, "-f"): _opt(b, "-t") for b in _find(commands, "docker", "build")}
    loaded = [w for w in load[3:] if not w.startswith("--") and w != cluster]
    assert sorted(loaded) == sorted(built.values())
    engine_image = example["spec"]["engine"]["image"]
    assert built["images/engine-cpu.Dockerfile"] == engine_image
    assert example["spec"]["engine"]["imagePullPolicy"] in ("IfNotPresent", "Never"), "kind-loaded, never pulled"

    # the chart, installed exactly as written
    install = _one(commands, "helm", "install")
    release, chart = install[2], install[3]
    namespace = _opt(install, "--namespace")
    sets = [install[i + 1] for i, w in enumerate(install) if w == "--set"]
    out = helm("template", release, str(ROOT / chart), "--namespace", namespace,
               *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 0, out.stderr
    (deployment,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == built["images/operator.Dockerfile"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert _opt(container["args"], "--engine-image") == engine_image  # the CPU image is the default too
    rollout = _one(commands, "kubectl", "-n", namespace, "rollout", "status")
    assert rollout[5] == f"deployment/{deployment['metadata']['name']}"


def test_the_example_renders_to_valid_cpu_objects(example, validate_object):
    assert example["spec"]["model"] == {"name": example["spec"]["model"]["name"], "demo": {}}
    assert example["spec"]["resources"]["gpus"] == 0
    out = subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", str(ROOT / EXAMPLE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "NetworkPolicy"}
    for obj in objects:
        validate_object(obj)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == example["spec"]["engine"]["image"]
    assert "--model" not in container["args"] and "--device" not in container["args"]
    assert not any("gpu" in k for k in container["resources"].get("limits", {}))


def test_the_requests_reach_the_example(commands, example):
    name, model = example["metadata"]["name"], example["spec"]["model"]["name"]
    assert _one(commands, "kubectl", "apply") == ["kubectl", "apply", "-f", EXAMPLE]
    wait = _one(commands, "kubectl", "wait")
    assert wait[2] == f"infsvc/{name}" and "--for=condition=Ready" in wait
    forward = _one(commands, "kubectl", "port-forward")
    assert forward[2] == f"svc/{name}" and forward[-1] == "&"
    local_port, remote_port = forward[3].split(":")
    assert remote_port == "8000"  # the Service's port (builders.common.HTTP_PORT)
    curl = _one(commands, "curl", "-s")
    url = next(w for w in curl if w.startswith("http"))
    assert url == f"http://localhost:{local_port}/v1/chat/completions"
    body = json.loads(_opt(curl, "-d"))
    assert body["model"] == model and body["messages"][0]["role"] == "user"
    client = _one(commands, "python", "examples/openai_client.py")
    assert _opt(client, "--base-url") == f"http://localhost:{local_port}/v1" and _opt(client, "--model") == model
