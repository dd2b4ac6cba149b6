"""The operator's RBAC needs, as data (the Helm chart renders its ClusterRole/Role from these).

Exactly the API groups, resources and verbs the operator calls; no wildcards, no Secrets (pods read
Hub tokens and API keys themselves through secretKeyRef). Per kind, from reconcile.py:
apply() gets, creates and patches; prune() lists and deletes the kinds in render.PRUNABLE_KINDS;
create-only kinds (Job, PVC) are never patched; pods are only listed (status, adapters).
"""

from __future__ import annotations

from typing import Any

RULES: list[dict[str, Any]] = [
    # The custom resource: kopf lists and watches it and patches its annotations/finalizer/status.
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices/status"], "verbs": ["patch"]},
    # Children kept true (never pruned).
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch"]},
    # Children created once (immutable specs).
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "create"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create"]},
    # Children kept true and pruned when the spec no longer wants them.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": ["get", "list", "create", "patch", "delete"]},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors", "podmonitors"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
    # Pods: their statuses (conditions) and IPs (live adapter loading).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # Events on the InferenceService (kopf posts them).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Cluster-wide mode only: kopf watches CRDs to notice the InferenceService CRD appearing.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]
