"""RBAC as data: what the chart grants must cover every call the operator makes, and no more."""

from __future__ import annotations

from pageant.operator import kube, rbac, render

NEVER_PATCHED = {"Job", "PersistentVolumeClaim"}


def _granted() -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rbac.RULES:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                out.setdefault((g, r), set()).update(rule["verbs"])
    return out


def test_no_wildcards_and_no_secrets():
    for rule in rbac.RULES:
        assert "*" not in rule["verbs"] + rule["apiGroups"] + rule["resources"]
    assert not any(r == "secrets" for _, r in _granted())


def test_rules_cover_every_call_and_nothing_more():
    needed: dict[tuple[str, str], set[str]] = {
        ("pageant.dev", "inferenceservices"): {"list", "watch", "patch"},
        ("pageant.dev", "inferenceservices/status"): {"patch"},
        ("", "events"): {"create"},
        ("", "pods"): {"list"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    }
    # What the endpoint picker's Role grants, the operator must hold (RBAC escalation check).
    for rule in rbac.EPP_RULES:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                needed.setdefault((g, r), set()).update(rule["verbs"])
    for kind, (api_version, plural, _) in kube.RESOURCES.items():
        if kind in ("InferenceService", "Pod"):
            continue
        group = api_version.split("/")[0] if "/" in api_version else ""
        verbs = {"get", "create"} | (set() if kind in NEVER_PATCHED else {"patch"})
        if kind in render.PRUNABLE_KINDS:
            verbs |= {"list", "delete"}
        needed.setdefault((group, plural), set()).update(verbs)
    assert _granted() == needed
