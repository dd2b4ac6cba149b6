"""The distribution's layout: import names, the stdlib `operator`, and the package list."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPED = {"engine": "pageant.engine", "kernels": "pageant.kernels", "operator": "pageant.operator", "pageant": "pageant"}


def test_stdlib_operator_still_works_from_repo_root():
    code = "import operator, pageant.operator; assert operator.add(2, 3) == 5; print(pageant.operator.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pageant.operator"


def test_every_subpackage_is_listed_in_pyproject():
    """Editable installs find unlisted subpackages; wheels do not. Keep the list complete."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_cli_dispatcher(argv):
    out = subprocess.run([sys.executable, "-m", "pageant.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_unknown_command_is_an_error():
    out = subprocess.run([sys.executable, "-m", "pageant.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown command" in out.stderr
