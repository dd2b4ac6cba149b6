"""Everything the operator creates for one InferenceService, as data (pure; no cluster needed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from pageant.operator import spec as spec_mod
from pageant.operator.builders import autoscale, monitoring, multinode, network, routing, storage, wake, workload
from pageant.operator.spec import InferenceServiceSpec


@dataclasses.dataclass(frozen=True)
class Child:
    """One desired child object and how to keep it true.

    create_only: the object's spec is immutable or must not be rewritten (Job, PVC), so an existing
    one is left alone. optional_api: the API group/version that may not be installed (KEDA,
    Prometheus Operator); if it is missing the child is skipped and reported, not an error."""
    manifest: dict[str, Any]
    create_only: bool = False
    optional_api: str | None = None
    # Maps (paths into the manifest) the operator owns whole: keys the live object has there and the
    # manifest does not are removed (a merge patch alone only adds and changes keys).
    owned_maps: tuple[tuple[str, ...], ...] = ()

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]


# Every kind the operator may create, for pruning what the spec no longer wants:
# kind -> apiVersion. (Job/PVC are never pruned: a cache is kept while the service exists.)
PRUNABLE_KINDS = {
    "Deployment": "apps/v1",  # the endpoint picker's, and the engine's when engine.nodes > 1
    "LeaderWorkerSet": multinode.API_VERSION,  # the engine's when engine.nodes > 1
    "Service": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "InterceptorRoute": wake.API_VERSION,
    "InferencePool": routing.POOL_API,
    "HTTPRoute": routing.ROUTE_API,
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "ConfigMap": "v1",
}
# Kinds whose CRDs may not be installed: skipped (and reported) rather than failing.
OPTIONAL_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "InterceptorRoute", "InferencePool", "HTTPRoute",
                  "LeaderWorkerSet"}
SELECTOR = ("spec", "selector")  # a Service's selector: leaders only with engine.nodes > 1, every pod without


def children(spec: InferenceServiceSpec, wake_available: bool = True) -> list[Child]:
    """The desired children, in creation order (storage and config before the Deployment).

    wake_available: the KEDA HTTP add-on is installed (the reconciler asks the API server; a file
    render assumes it). Without it a scale-to-zero service gets no wake-up objects and does not idle."""
    out: list[Child] = []
    if spec.model.cache is not None:
        out += [Child(storage.cache_pvc(spec), create_only=True), Child(storage.download_job(spec), create_only=True)]
    if spec.lora_enabled:
        out.append(Child(storage.adapters_config_map(spec)))
    if spec.parallel.multinode:  # switching nodes prunes the other kind (the old one is not wanted)
        out.append(Child(multinode.leader_worker_set(spec), optional_api=multinode.API_VERSION))
    else:
        out.append(Child(workload.deployment(spec)))
    out.append(Child(network.service(spec), owned_maps=(SELECTOR,)))
    if spec.network_policy:
        out.append(Child(network.network_policy(spec)))
    if network.wants_pdb(spec):
        out.append(Child(network.pod_disruption_budget(spec)))
    if spec.autoscaling is not None:
        if spec.autoscaling.provider == "keda":
            out.append(Child(autoscale.scaled_object(spec, wake_available), optional_api="keda.sh/v1alpha1"))
            if spec.wakes_from_zero and wake_available:
                out += [Child(wake.interceptor_route(spec), optional_api=wake.API_VERSION),
                        Child(wake.wake_service(spec))]
        else:
            out.append(Child(autoscale.horizontal_pod_autoscaler(spec)))
    if spec.monitoring is not None:
        out.append(Child(monitoring.monitor(spec), optional_api="monitoring.coreos.com/v1",
                         owned_maps=(SELECTOR + ("matchLabels",),)))
    if spec.routing is not None:
        optional = {"InferencePool": routing.POOL_API, "HTTPRoute": routing.ROUTE_API}
        out += [Child(m, optional_api=optional.get(m["kind"]),
                      owned_maps=(SELECTOR + ("matchLabels",),) if m["kind"] == "InferencePool" else ())
                for m in routing.children(spec)]
    return out


def render_documents(docs: list[dict[str, Any]], default_image: str = spec_mod.DEFAULT_ENGINE_IMAGE) -> str:
    """YAML stream of every child of every InferenceService in docs (other kinds are ignored)."""
    out = []
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "InferenceService":
            continue
        for child in children(spec_mod.parse(doc, default_image)):
            out.append(yaml.safe_dump(child.manifest, sort_keys=False))
    return "---\n".join(out)
