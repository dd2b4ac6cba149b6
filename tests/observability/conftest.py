"""Fixtures for the observability tests: the chart's rendered rules and dashboards, and promtool."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.conftest import require_helm, require_prometheus

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
RELEASE, NAMESPACE = "pt", "pageant-system"


def render_chart(*set_: str) -> list[dict[str, Any]]:
    """`helm template` with `--set-json KEY=JSON` overrides."""
    args = [require_helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in set_:
        args += ["--set-json", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def rule_groups(*set_: str) -> list[dict[str, Any]]:
    """The PrometheusRule's groups as the chart renders them (rules on, operator ServiceMonitor on)."""
    objs = render_chart("prometheusRule.enabled=true", "metrics.serviceMonitor.enabled=true", *set_)
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


@pytest.fixture(scope="session")
def rendered_rules_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("rules") / "pageant-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_prometheus("promtool")


def load_tool(name: str):
    """A module of charts/pageant/tools/ (not a package: loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"pageant_chart_tools_{name}", CHART / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboard_module():
    return load_tool("dashboards")


def load_dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((CHART / "files" / "dashboards").glob("*.json"))}


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def variable_queries(dash: dict) -> list[tuple[str, str]]:
    """Grafana's `label_values(SELECTOR, LABEL)` as the PromQL `count by (LABEL) (SELECTOR)`."""
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        out.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def substitute(expr: str, rate_interval: str = "1m", **variables: str) -> str:
    """Replace Grafana's variables: $__rate_interval, and every $var by its regex (default `.*`)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), ".*"), expr)


@pytest.fixture(scope="session")
def obs():
    """The helpers above, for test modules (which cannot import conftest under importlib mode)."""
    import types

    return types.SimpleNamespace(
        ROOT=ROOT, CHART=CHART, render_chart=render_chart, rule_groups=rule_groups,
        dashboard_module=dashboard_module, load_tool=load_tool, load_dashboards=load_dashboards, dashboard_queries=dashboard_queries,
        variable_queries=variable_queries, substitute=substitute, require_prometheus=require_prometheus,
    )
