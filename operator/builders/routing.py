"""Gateway routing that knows the engine (Gateway API Inference Extension).

An InferencePool of the service's engine pods (port 8000), its endpoint picker (the extension's
EPP: a Deployment, Service, ServiceAccount, least-privilege Role/RoleBinding and its
EndpointPickerConfig) and an HTTPRoute from the named Gateway to the pool. The picker scores pods
on the ``vllm:`` metrics the engine exports: queue depth, KV-cache usage, LoRA adapters in use,
plus its own prefix-cache index.
"""

from __future__ import annotations

from typing import Any

import yaml

from pageant.operator import rbac
from pageant.operator.builders import common
from pageant.operator.spec import InferenceServiceSpec
from pageant.operator.spec_ext import InferencePoolSpec

POOL_API = "inference.networking.k8s.io/v1"
ROUTE_API = "gateway.networking.k8s.io/v1"
EPP_GRPC_PORT, EPP_HEALTH_PORT, EPP_METRICS_PORT = 9002, 9003, 9090
EPP_COMPONENT = "endpoint-picker"
EPP_CONFIG_FILE = "epp-config.yaml"
EPP_UID = 65532  # the EPP image is distroless "nonroot"
# The engine's metric names (its /metrics), passed to the picker explicitly.
EPP_METRIC_FLAGS = ["--total-queued-requests-metric", "vllm:num_requests_waiting",
                    "--kv-cache-usage-percentage-metric", "vllm:kv_cache_usage_perc",
                    "--lora-info-metric", "vllm:lora_requests_info"]
# scorer -> weight in the default scheduling profile.
SCORERS = {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3,
           "lora-affinity-scorer": 1}


def _pool(spec: InferenceServiceSpec) -> InferencePoolSpec:
    if spec.routing is None:
        raise ValueError("needs spec.routing.inferencePool.enabled")
    return spec.routing


def epp_labels(spec: InferenceServiceSpec) -> dict[str, str]:
    """The picker's pod selector (not the engine's: the pool must not select the picker)."""
    return {common.INSTANCE_LABEL: spec.name, "app.kubernetes.io/component": EPP_COMPONENT}


def inference_pool(spec: InferenceServiceSpec) -> dict[str, Any]:
    p = _pool(spec)
    return {
        "apiVersion": POOL_API, "kind": "InferencePool",
        "metadata": common.metadata(spec, common.names(spec)["inferencepool"], "routing"),
        "spec": {"selector": {"matchLabels": common.serving_labels(spec)},  # with nodes > 1: leaders
                 "targetPorts": [{"number": common.HTTP_PORT}],
                 "endpointPickerRef": {"name": common.names(spec)["epp"], "port": {"number": EPP_GRPC_PORT},
                                       "failureMode": p.failure_mode}},
    }


def http_route(spec: InferenceServiceSpec) -> dict[str, Any]:
    p = _pool(spec)
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": p.gateway_name,
                              "namespace": p.gateway_namespace}
    if p.section_name:
        parent["sectionName"] = p.section_name
    return {
        "apiVersion": ROUTE_API, "kind": "HTTPRoute",
        "metadata": common.metadata(spec, common.names(spec)["httproute"], "routing"),
        "spec": {"parentRefs": [parent], "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                             "name": common.names(spec)["inferencepool"]}]}]},
    }


def epp_config(spec: InferenceServiceSpec) -> str:
    """The picker's EndpointPickerConfig: one profile, the four scorers, the max-score picker."""
    scorers = {k: v for k, v in SCORERS.items() if k != "lora-affinity-scorer" or spec.lora_enabled}
    config = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig",
        "plugins": [{"type": "single-profile-handler"}] + [{"type": t} for t in scorers]
                   + [{"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": t, "weight": w} for t, w in scorers.items()] + [{"pluginRef": "max-score-picker"}]}],
    }
    return yaml.safe_dump(config, sort_keys=False)


def epp_config_map(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": common.metadata(spec, common.names(spec)["epp"], EPP_COMPONENT),
            "data": {EPP_CONFIG_FILE: epp_config(spec)}}


def epp_deployment(spec: InferenceServiceSpec) -> dict[str, Any]:
    p, name = _pool(spec), common.names(spec)["epp"]
    probe = {"grpc": {"port": EPP_HEALTH_PORT, "service": "inference-extension"},
             "initialDelaySeconds": 5, "periodSeconds": 10}
    container = {
        "name": "epp", "image": p.epp_image,
        "args": ["--pool-name", common.names(spec)["inferencepool"], "--pool-namespace", spec.namespace,
                 "--config-file", f"/config/{EPP_CONFIG_FILE}", "--zap-encoder", "json", *EPP_METRIC_FLAGS],
        "ports": [{"name": "grpc", "containerPort": EPP_GRPC_PORT},
                  {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT},
                  {"name": "metrics", "containerPort": EPP_METRICS_PORT}],
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "livenessProbe": probe, "readinessProbe": probe,
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "config", "mountPath": "/config", "readOnly": True}],
    }
    labels = {**common.common_labels(spec), **epp_labels(spec)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": common.metadata(spec, name, EPP_COMPONENT),
        "spec": {"replicas": p.epp_replicas, "selector": {"matchLabels": epp_labels(spec)}, "template": {
            "metadata": {"labels": labels, "annotations": {
                common.CONFIG_HASH_ANNOTATION: common.config_hash(epp_config(spec))}},
            "spec": {"serviceAccountName": name, "terminationGracePeriodSeconds": 130,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": EPP_UID, "runAsGroup": EPP_UID,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container],
                     "volumes": [{"name": "config", "configMap": {"name": name}}]}}},
    }


def epp_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": common.metadata(spec, common.names(spec)["epp"], EPP_COMPONENT),
            "spec": {"type": "ClusterIP", "selector": epp_labels(spec), "ports": [
                {"name": "grpc-ext-proc", "port": EPP_GRPC_PORT, "targetPort": EPP_GRPC_PORT,
                 "protocol": "TCP", "appProtocol": "http2"},
                {"name": "http-metrics", "port": EPP_METRICS_PORT, "targetPort": EPP_METRICS_PORT,
                 "protocol": "TCP"}]}}


def epp_service_account(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": common.metadata(spec, common.names(spec)["epp"], EPP_COMPONENT)}


def epp_role(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Read-only, namespaced: the pods it picks from, its pool, objectives and rewrites."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": common.metadata(spec, common.names(spec)["epp"], EPP_COMPONENT),
            "rules": [dict(r) for r in rbac.EPP_RULES]}


def epp_role_binding(spec: InferenceServiceSpec) -> dict[str, Any]:
    name = common.names(spec)["epp"]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": common.metadata(spec, name, EPP_COMPONENT),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]}


def children(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """Every routing object, in creation order (RBAC and config before the picker, pool, route)."""
    return [epp_service_account(spec), epp_role(spec), epp_role_binding(spec), epp_config_map(spec),
            epp_deployment(spec), epp_service(spec), inference_pool(spec), http_route(spec)]
