"""The operator's RBAC needs, as data (the Helm chart renders its ClusterRole from these).

Exactly the API groups, resources and verbs the operator uses; no wildcards, no Secrets (the pods
read Hub tokens and API keys themselves through secretKeyRef).
"""

from __future__ import annotations

from typing import Any

RULES: list[dict[str, Any]] = [
    # The custom resource: watch it, keep kopf's annotations on it, write its status.
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices"],
     "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": ["pageant.dev"], "resources": ["inferenceservices/status"], "verbs": ["get", "patch", "update"]},
    # Children.
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "configmaps", "persistentvolumeclaims"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors", "podmonitors"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    # Pods: read their status and IPs (for conditions and live adapter loading).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # Events: kopf and the operator report to the InferenceService.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # kopf's startup scan: which namespaces and CRDs exist.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
]
