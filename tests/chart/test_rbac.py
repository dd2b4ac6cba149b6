"""Least privilege: the chart's RBAC is exactly the operator's RULES, without wildcards or Secrets,
in a ClusterRole (all namespaces) or Roles in the watched namespaces (namespaced mode)."""

from __future__ import annotations

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def _canon(rules):
    """Rules as a set of (apiGroup, resource, verb) grants."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _chart_rules():
    return yaml.safe_load((CHART / "files" / "rbac" / "operator-rules.yaml").read_text())


def test_chart_rules_equal_operator_rules():
    from pageant.operator.rbac import RULES

    assert _canon(_chart_rules()) == _canon(RULES)
    assert _chart_rules() == [dict(r) for r in RULES], "run `python charts/pageant/tools/sync.py`"


def test_no_wildcards_no_secrets():
    for g, r, v in _canon(_chart_rules()):
        assert "*" not in (g, r, v)
        assert r not in {"secrets", "secrets/status"}
        assert v not in {"escalate", "bind", "impersonate", "deletecollection"}


def test_all_namespaces_mode(render):
    objs = render()
    (cr,) = [o for o in objs if o["kind"] == "ClusterRole"]
    (crb,) = [o for o in objs if o["kind"] == "ClusterRoleBinding"]
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
    assert _canon(cr["rules"]) == _canon(_chart_rules())
    (sa,) = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr["metadata"]["name"]}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "pageant-system"}]


def test_namespaced_mode(render):
    objs = render(CHART / "ci" / "namespaced-values.yaml")
    roles = [o for o in objs if o["kind"] == "Role"]
    bindings = [o for o in objs if o["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    everything = _canon(_chart_rules())
    namespaced = {g for g in everything if g[1] not in CLUSTER_SCOPED}
    for role in roles:
        assert _canon(role["rules"]) == namespaced
    # With --namespace the operator scans nothing cluster-wide: no cluster-scoped permission at all.
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role" and b["subjects"][0]["namespace"] == "pageant-system"


def test_rbac_create_false(render):
    objs = render(set_=("rbac.create=false",))
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
