"""Names, labels, owner references and the config hash shared by every child object."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pageant.operator import schema, spec_parallel
from pageant.operator.spec import InferenceServiceSpec

HTTP_PORT = 8000
MANAGED_BY = "pageant-operator"
INSTANCE_LABEL = "pageant.dev/inferenceservice"
COMPONENT = "engine"
CONFIG_HASH_ANNOTATION = "pageant.dev/config-hash"
# Set by the LeaderWorkerSet controller on every pod of a group: "0" on the leader (the pod that
# serves the API), 1.. on the workers.
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
ADAPTERS_MOUNT = "/etc/pageant/adapters"
ADAPTERS_FILE = "adapters.json"
MODEL_MOUNT = "/models"
ADAPTER_PVC_MOUNT = "/adapters"
HF_HOME = "/cache/huggingface"
# The UID and GID of the images' USER (images/*.Dockerfile): every pod runs as it, and fsGroup lets
# it write the volumes (HF cache, model cache). A test checks the Dockerfiles use the same number.
RUN_AS_USER = 10001


def pod_security_context() -> dict[str, Any]:
    """The pods' securityContext ("restricted" Pod Security Standard, the images' UID)."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def names(spec: InferenceServiceSpec) -> dict[str, str]:
    """Child object names, all derived from the InferenceService name (<= 52 chars, so <= 63)."""
    n = spec.name
    return {"deployment": n, "service": n, "adapters": f"{n}-adapters", "pdb": n, "networkpolicy": n,
            "scaledobject": n, "hpa": n, "monitor": n, "cache_pvc": f"{n}-model-cache",
            "cache_job": f"{n}-model-download", "interceptorroute": n, "wake": f"{n}-wake",
            "inferencepool": n, "epp": f"{n}-epp", "httproute": n,
            "leaderworkerset": f"{n}{spec_parallel.LWS_SUFFIX}"}


def selector_labels(spec: InferenceServiceSpec) -> dict[str, str]:
    """The Deployment selector (immutable once created: never add to it)."""
    return {INSTANCE_LABEL: spec.name, "app.kubernetes.io/component": COMPONENT}


def serving_labels(spec: InferenceServiceSpec) -> dict[str, str]:
    """The pods that serve the API: every engine pod, or with engine.nodes > 1 only the groups'
    leaders (workers are headless). What the Service, the InferencePool, a PodMonitor and the
    scale subresource's selector (HPA's per-pod metrics: one per replica) select."""
    if spec.parallel.multinode:
        return {**selector_labels(spec), LWS_WORKER_INDEX_LABEL: "0"}
    return selector_labels(spec)


def serves_api(spec: InferenceServiceSpec, pod: dict[str, Any]) -> bool:
    """Whether one of the service's pods (listed by selector_labels) serves the API: every one, or
    with engine.nodes > 1 a group's leader."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return not spec.parallel.multinode or labels.get(LWS_WORKER_INDEX_LABEL) == "0"


def selector_string(spec: InferenceServiceSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(serving_labels(spec).items()))


def common_labels(spec: InferenceServiceSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pageant-engine",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/part-of": "pageant",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        INSTANCE_LABEL: spec.name,
    }


def owner_references(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """Controller owner reference to the InferenceService (needs its uid; absent when rendering a file)."""
    if not spec.uid:
        return []
    return [{"apiVersion": schema.API_VERSION, "kind": schema.KIND, "name": spec.name, "uid": spec.uid,
             "controller": True, "blockOwnerDeletion": True}]


def metadata(spec: InferenceServiceSpec, name: str, component: str | None = None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": spec.namespace,
                            "labels": {**common_labels(spec), **({"app.kubernetes.io/component": component}
                                                                 if component else {}), **(labels or {})}}
    refs = owner_references(spec)
    if refs:
        meta["ownerReferences"] = refs
    return meta


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def url(spec: InferenceServiceSpec) -> str:
    return f"http://{spec.name}.{spec.namespace}.svc.cluster.local:{HTTP_PORT}/v1"
