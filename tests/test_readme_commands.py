"""The README's two commands hold on a fresh clone: the first installs what serving needs and serves,
the second (`bash tests/run`) is what CI runs and installs the test prerequisites itself. Checked on a
`git clone` of this repository (so what is committed, with its file modes), without running either
command. Also tests/fetch_schemas.py: its pinned table covers the schemas the tests use."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import require_schemas_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> pathlib.Path:
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout")
    dest = tmp_path_factory.mktemp("clone") / "pageant"
    out = subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return dest


def _commands(root: pathlib.Path) -> list[str]:
    """The non-empty lines of the README's first fenced block."""
    block = re.search(r"^```[^\n]*\n(.*?)^```", (root / "README.md").read_text(), re.S | re.M)
    assert block, "README.md has no fenced block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _pip_installs(line: str) -> list[list[str]]:
    """The arguments of each `pip install` in a `&&`-chained command line."""
    out = []
    for part in line.split("&&"):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


def _extras(spec: str) -> set[str]:
    m = re.search(r"\[(.*)\]", spec)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def test_readme_has_two_commands(clone):
    assert len(_commands(clone)) == 2, _commands(clone)


def test_first_line_installs_the_server_only_and_serves(clone):
    line = _commands(clone)[0]
    installs = _pip_installs(line)
    assert installs and installs[0] == ["torch==2.13.0"], "the CPU torch must be installed first"
    editable = [args[args.index("-e") + 1] for args in installs if "-e" in args]
    assert editable, line
    extras = set().union(*map(_extras, editable))
    assert "server" in extras and not extras & {"test", "all"}, extras
    assert line.rstrip().endswith("pageant serve"), line


def test_torch_range_accepts_the_cpu_build():
    """pip keeps torch 2.13.0 (installed first) for every extra: no extra may pull a CUDA build."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch = [Requirement(r) for reqs in extras.values() for r in reqs if Requirement(r).name == "torch"]
    assert torch and all(r.specifier.contains("2.13.0") for r in torch), torch


def test_ci_runs_the_second_line(clone):
    line = _commands(clone)[1].strip()
    assert line in ("bash tests/run", "tests/run"), line
    ci = [ln.strip() for ln in (clone / ".ci" / "run").read_text().splitlines()]
    assert line in ci, f".ci/run does not run {line!r}"


def test_tests_run_is_executable_and_complete(clone):
    script = clone / "tests" / "run"
    assert script.is_file() and os.access(script, os.X_OK), "tests/run is not committed executable"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "../shared/schemas" in text and "PAGEANT_SCHEMAS_DIR" in text
    assert "torch==2.13.0" in text and "'.[test]'" in text
    assert ".ci/install-helm" in text and "prometheus" in text
    last = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")][-1]
    assert last == 'exec .venv/bin/pytest "$@"', last


def test_clone_has_the_fetch_script(clone):
    assert (clone / "tests" / "fetch_schemas.py").is_file()
    assert "tests/fetch_schemas.py" in (clone / "README.md").read_text()


def _fetch_module():
    spec = importlib.util.spec_from_file_location("pageant_fetch_schemas", ROOT / "tests" / "fetch_schemas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_table_covers_the_schemas_folder():
    folder = require_schemas_dir()
    present = {p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")}
    assert set(_fetch_module().SCHEMAS) == present


def test_urls_are_raw_files_at_the_pinned_commit():
    module = _fetch_module()
    assert module.url("keda.sh_scaledobjects.yaml") == (
        "https://raw.githubusercontent.com/kedacore/keda/8b4f083ca8c8c2baf8477e322bd4d16ac4dfa09a/"
        "config/crd/bases/keda.sh_scaledobjects.yaml")
    for name, (repo, path, commit) in module.SCHEMAS.items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and re.fullmatch(r"[0-9a-f]{40}", commit), name
        assert module.url(name) == f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"
        assert path.rsplit("/", 1)[-1] in (name, "openapi.yaml"), name


def test_list_prints_the_table_without_downloading():
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "fetch_schemas.py"), "--list"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "https_proxy": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    table = _fetch_module().SCHEMAS
    assert len(lines) == len(table)
    for line, (name, (repo, path, commit)) in zip(lines, table.items()):
        assert line.split() == [name, repo, commit, path]


def test_yaml_check_refuses_empty_and_html():
    module = _fetch_module()
    module.check_yaml("ok.yaml", b"apiVersion: v1\nkind: CustomResourceDefinition\n")
    for bad in (b"", b"  \n", b"<html><body>404</body></html>", b"[unclosed"):
        with pytest.raises(ValueError):
            module.check_yaml("bad.yaml", bad)
