"""KEDA ScaledObject or autoscaling/v2 HPA. Both drive the InferenceService's scale subresource.

Scaling the InferenceService (not the Deployment) keeps one writer of Deployment.spec.replicas: the
operator copies spec.replicas down, so `kubectl scale infsvc`, KEDA and HPA all work the same way.
"""

from __future__ import annotations

from typing import Any

from pageant.operator import schema
from pageant.operator.builders import common, wake
from pageant.operator.spec import InferenceServiceSpec

# signal -> (engine metric, aggregation). Every query is a total over the service's replicas, and
# KEDA's AverageValue target divides it by the target per replica.
SIGNALS = {
    "WaitingRequests": "vllm:num_requests_waiting",
    "RunningRequests": "vllm:num_requests_running",
    "KVCacheUsage": "vllm:kv_cache_usage_perc",
}
# prometheus-adapter's default renaming of the engine metrics (":" is not allowed in the API).
HPA_METRIC_NAMES = {k: v.replace(":", "_") for k, v in SIGNALS.items()}


def promql(spec: InferenceServiceSpec) -> str:
    a = spec.autoscaling
    if a is None:
        raise ValueError("promql() needs spec.autoscaling")
    if a.metric == "Custom":
        return a.query or ""
    return f'sum({SIGNALS[a.metric]}{{namespace="{spec.namespace}",model_name="{spec.model.name}"}})'


def _target(value: float) -> str:
    return f"{value:g}"


def _scale_target(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": schema.API_VERSION, "kind": schema.KIND, "name": spec.name}


def scaled_object(spec: InferenceServiceSpec, wake_available: bool = True) -> dict[str, Any]:
    """KEDA ScaledObject with a Prometheus trigger. minReplicas 0 becomes idleReplicaCount 0 (KEDA's
    scale to zero) with minReplicaCount 1 while active; initialCooldownPeriod covers model load.

    With scale from zero (spec.wakes_from_zero) a second trigger, the HTTP add-on's pending-request
    count (external-push), activates it from zero; the engine metrics scale it between 1 and max.
    Where the add-on is missing (wake_available False) it does not idle: a service that cannot wake
    stays at one replica."""
    a = spec.autoscaling
    if a is None or a.provider != "keda":
        raise ValueError("scaled_object() needs spec.autoscaling with provider keda")
    body: dict[str, Any] = {
        "scaleTargetRef": _scale_target(spec),
        "pollingInterval": a.polling_interval_seconds,
        "cooldownPeriod": a.cooldown_period_seconds,
        "initialCooldownPeriod": a.initial_cooldown_period_seconds,
        "minReplicaCount": max(a.min_replicas, 1),
        "maxReplicaCount": a.max_replicas,
        "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
            "serverAddress": a.prometheus_address, "query": promql(spec), "threshold": _target(a.target),
            "activationThreshold": "0", "ignoreNullValues": "true"}}],
    }
    if spec.wakes_from_zero and wake_available:
        body["triggers"].append(wake.external_push_trigger(spec))
    if a.min_replicas == 0 and (wake_available or not spec.wakes_from_zero):
        body["idleReplicaCount"] = 0
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": common.metadata(spec, common.names(spec)["scaledobject"], "autoscaler"), "spec": body}


def horizontal_pod_autoscaler(spec: InferenceServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 HPA on a per-pod metric from prometheus-adapter (average per replica)."""
    a = spec.autoscaling
    if a is None or a.provider != "hpa":
        raise ValueError("horizontal_pod_autoscaler() needs spec.autoscaling with provider hpa")
    metric = a.hpa_metric_name or HPA_METRIC_NAMES[a.metric]
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": common.metadata(spec, common.names(spec)["hpa"], "autoscaler"),
        "spec": {
            "scaleTargetRef": _scale_target(spec),
            "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                   "target": {"type": "AverageValue",
                                                              "averageValue": _target(a.target)}}}],
            # Model loads take minutes: scale up promptly, scale down slowly.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.cooldown_period_seconds}},
        },
    }
