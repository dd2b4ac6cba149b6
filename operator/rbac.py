"""The operator's RBAC needs, as data (the Helm chart renders its ClusterRole/Role from these).

Exactly the API groups, resources and verbs the operator calls; no wildcards, no Secrets (pods read
Hub tokens and API keys themselves through secretKeyRef). Per kind, from reconcile.py:
apply() gets, creates and patches; prune() lists and deletes the kinds in render.PRUNABLE_KINDS;
create-only kinds (Job, PVC) are never patched; pods are only listed (status, adapters).
The endpoint picker's Role (routing) is :data:`EPP_RULES`; the API server lets the operator grant
only what it holds itself, so RULES also hold those reads (pods get/watch, the extension's kinds).
"""

from __future__ import annotations

from typing import Any

# The endpoint picker's namespaced, read-only Role (the extension's own chart grants the same).
EPP_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives", "inferencemodelrewrites"],
     "verbs": ["get", "list", "watch"]},
]
_PRUNED = ["get", "list", "create", "patch", "delete"]

RULES: list[dict[str, Any]] = [
    # The custom resource: kopf lists and watches it and patches its annotations/finalizer/status.
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices/status"], "verbs": ["patch"]},
    # Children kept true and pruned when the spec no longer wants them (the endpoint picker's
    # Deployment and Service, the wake-up Service, its ServiceAccount and RBAC).
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _PRUNED},
    # The engine's workload when spec.engine.nodes > 1 (the Deployment's otherwise); pruned on a switch.
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"], "verbs": _PRUNED},
    {"apiGroups": [""], "resources": ["services", "serviceaccounts"], "verbs": _PRUNED},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": _PRUNED},
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
    {"apiGroups": ["http.keda.sh"], "resources": ["interceptorroutes"], "verbs": _PRUNED},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": _PRUNED},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    # Pods: their statuses (conditions) and IPs (live adapter loading); get and watch only so that
    # the operator may grant them to the endpoint picker.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # Only to grant them to the endpoint picker (never called by the operator).
    {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives", "inferencemodelrewrites"],
     "verbs": ["get", "list", "watch"]},
    # Events on the InferenceService (kopf posts them).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # Cluster-wide mode only: kopf watches CRDs to notice the InferenceService CRD appearing.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]
