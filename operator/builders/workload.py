"""The engine Deployment: `pageant serve` args, probes, volumes, security, rollout, config hash.

Why the adapters live in a ConfigMap that is NOT hashed: adding or removing an adapter must not
restart replicas. The pod mounts the ConfigMap as a directory (``--lora-modules-file``), so a replica
that starts or restarts reads the current set before it turns ready, and running replicas pick up
changes when kubelet refreshes the volume (which can take over a minute; the operator therefore
also calls each ready pod's load/unload endpoints at once, see reconcile/adapters.py). Only the
ConfigMap's *name* is in the pod template, so the template hash, and thus the rollout, changes only
when the serving configuration does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pageant.operator.builders import common
from pageant.operator.spec import InferenceServiceSpec

PRESTOP_SLEEP_SECONDS = 10  # let endpoints controllers drop the pod before the engine drains
GRACE_SLACK_SECONDS = 15
DOWNLOAD_MARKER = ".pageant-download-complete"


def model_dir(spec: InferenceServiceSpec) -> str:
    """Where the model's files are inside the container (for pvc and cache sources)."""
    if spec.model.pvc is not None:
        return f"{common.MODEL_MOUNT}/{spec.model.pvc.path}".rstrip("/")
    if spec.model.cache is not None:
        hub = spec.model.cache.hub
        return f"{common.MODEL_MOUNT}/{hub.repo.replace('/', '--')}/{hub.revision or 'main'}"
    raise ValueError("model_dir is only defined for pvc and cache sources")


def adapter_claims(spec: InferenceServiceSpec) -> list[str]:
    """Distinct PVCs that hold adapters (each gets one read-only volume)."""
    return sorted({a.pvc.claim_name for a in spec.adapters if a.pvc is not None})


def adapter_root_restricted(spec: InferenceServiceSpec) -> bool:
    """Whether the engine may load adapters only from under /adapters (--allowed-lora-root).

    On when adapters come from PVCs only: then the load endpoint cannot be pointed elsewhere. The
    engine downloads Hub adapters only without a root, so any Hub adapter turns it off. It depends
    on the claims (already part of the template, as volumes) and on whether any Hub adapter is
    listed: adding or removing adapters of a kind the service already has never rolls pods;
    the first Hub adapter on a PVC-only service (or removing the last one) rolls them once."""
    return bool(adapter_claims(spec)) and not any(a.hub is not None for a in spec.adapters)


def adapter_entries(spec: InferenceServiceSpec) -> list[dict[str, str]]:
    """The adapters file's list and what /v1/load_lora_adapter is called with (lora_name, lora_path).

    A PVC adapter's path is under /adapters/<claim>/; a Hub adapter's path is its repo id
    (``revision`` is added when set) and the engine downloads it."""
    out = []
    for a in spec.adapters:
        if a.pvc is not None:
            out.append({"name": a.name,
                        "path": f"{common.ADAPTER_PVC_MOUNT}/{a.pvc.claim_name}/{a.pvc.path}".rstrip("/")})
        elif a.hub is not None:
            entry = {"name": a.name, "path": a.hub.repo}
            if a.hub.revision:
                entry["revision"] = a.hub.revision
            out.append(entry)
    return out


def engine_args(spec: InferenceServiceSpec, node_args: Sequence[str] = ()) -> list[str]:
    """Arguments after `pageant serve`, derived from the spec only; ``node_args`` (one pod's place
    in a multi-node group, see builders/multinode.py) go before the user's extraArgs."""
    e, m, par = spec.engine, spec.model, spec.parallel
    # no --model: `pageant serve` serves the demo model bundled in the image
    args = [] if m.demo else ["--model", m.hub.repo if m.hub is not None else model_dir(spec)]
    args += ["--served-model-name", m.name, "--host", "0.0.0.0", "--port", str(common.HTTP_PORT)]
    if m.hub is not None:
        if m.hub.revision:
            args += ["--revision", m.hub.revision]
        args += ["--download-dir", f"{common.HF_HOME}/hub"]
    if spec.resources.gpus > 0:
        args += ["--device", "cuda"]
    for flag, value in [("--dtype", e.dtype), ("--max-model-len", e.max_model_len),
                        ("--max-num-seqs", e.max_num_seqs), ("--max-num-batched-tokens", e.max_num_batched_tokens),
                        ("--gpu-memory-utilization", e.gpu_memory_utilization),
                        ("--max-queued-requests", e.max_queued_requests),
                        ("--tensor-parallel-size", par.tensor_parallel_size),
                        ("--pipeline-parallel-size", par.pipeline_parallel_size)]:
        if value is not None:
            args += [flag, str(value)]
    args += ["--shutdown-timeout", str(e.shutdown_timeout_seconds)]
    if e.enable_prefix_caching:
        args.append("--enable-prefix-caching")
    if spec.lora_enabled:
        args.append("--enable-lora")  # never derived from the adapter count: that would roll pods
        if e.max_loras is not None:
            args += ["--max-loras", str(e.max_loras)]
        if e.max_lora_rank is not None:
            args += ["--max-lora-rank", str(e.max_lora_rank)]
        if e.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(e.max_cpu_loras)]
        args += ["--lora-modules-file", f"{common.ADAPTERS_MOUNT}/{common.ADAPTERS_FILE}"]
        if adapter_root_restricted(spec):
            args += ["--allowed-lora-root", common.ADAPTER_PVC_MOUNT]
    if e.api_key is not None:
        args += ["--api-key", "$(PAGEANT_API_KEY)"]  # expanded by kubelet from the env below
    return args + list(node_args) + list(e.extra_args)


def _env(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": common.HF_HOME}, {"name": "HOME", "value": "/tmp"}]
    token = spec.model.hub.token if spec.model.hub else None
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    hub_tokens = [a.hub.token for a in spec.adapters if a.hub is not None and a.hub.token is not None]
    if token is None and hub_tokens:
        t = hub_tokens[0]
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": t.name, "key": t.key}}})
    if spec.engine.api_key is not None:
        ref = spec.engine.api_key
        env.append({"name": "PAGEANT_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env + [dict(e) for e in spec.engine.env]


def _volumes(spec: InferenceServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = common.names(spec)
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "hf-cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                                    {"name": "hf-cache", "mountPath": common.HF_HOME}]
    claim = (spec.model.pvc.claim_name if spec.model.pvc else names["cache_pvc"] if spec.model.cache else None)
    if claim is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": common.MODEL_MOUNT, "readOnly": True})
    if spec.lora_enabled:
        volumes.append({"name": "adapters-config", "configMap": {"name": names["adapters"]}})
        mounts.append({"name": "adapters-config", "mountPath": common.ADAPTERS_MOUNT, "readOnly": True})
    for i, c in enumerate(adapter_claims(spec)):
        volumes.append({"name": f"adapters-{i}", "persistentVolumeClaim": {"claimName": c, "readOnly": True}})
        mounts.append({"name": f"adapters-{i}", "mountPath": f"{common.ADAPTER_PVC_MOUNT}/{c}", "readOnly": True})
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "readOnlyRootFilesystem": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _probe(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def pod_template(spec: InferenceServiceSpec, node_args: Sequence[str] = (), serves_api: bool = True,
                 extra_ports: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The pod template, with the config-hash annotation of everything else in it.

    A pod that does not serve the API (a multi-node group's headless worker) has no `http` port,
    no probes (its leader's probes speak for the group) and no preStop drain."""
    e, r, s = spec.engine, spec.resources, spec.scheduling
    volumes, mounts = _volumes(spec)
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpu is not None:
        requests["cpu"] = r.cpu
    if r.memory is not None:
        requests["memory"] = limits["memory"] = r.memory
    if r.gpus > 0:
        limits[r.gpu_resource_name] = str(r.gpus)
    ports = [{"name": "http", "containerPort": common.HTTP_PORT, "protocol": "TCP"}] if serves_api else []
    container: dict[str, Any] = {
        "name": "engine", "image": e.image, "command": ["pageant", "serve"], "args": engine_args(spec, node_args),
        "env": _env(spec), "ports": ports + [dict(p) for p in extra_ports],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": mounts,
        "startupProbe": _probe("/health", 10, max(1, math.ceil(e.startup_timeout_seconds / 10)), 5),
        "readinessProbe": _probe("/ready", 5, 3, 5),
        "livenessProbe": _probe("/health", 15, 4, 10),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": _container_security(),
    }
    if not serves_api:
        for key in ("startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
            del container[key]
    if not container["ports"]:
        del container["ports"]
    if e.image_pull_policy:
        container["imagePullPolicy"] = e.image_pull_policy
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_SECONDS + e.shutdown_timeout_seconds + GRACE_SLACK_SECONDS,
        "securityContext": common.pod_security_context(),
    }
    if spec.model.cache is not None:  # replicas wait until the download Job has filled the cache
        marker = f"{model_dir(spec)}/{DOWNLOAD_MARKER}"
        pod["initContainers"] = [{
            "name": "wait-for-model", "image": e.image, "command": ["sh", "-c",
                                                                    f'until [ -f "{marker}" ]; do echo waiting for {marker}; sleep 10; done'],
            "volumeMounts": [{"name": "model", "mountPath": common.MODEL_MOUNT, "readOnly": True}],
            "securityContext": _container_security(),
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}}]
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if s.node_selector:
        pod["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod["tolerations"] = [dict(t) for t in s.tolerations]
    if s.affinity:
        pod["affinity"] = s.affinity
    if s.priority_class_name:
        pod["priorityClassName"] = s.priority_class_name
    if s.runtime_class_name:
        pod["runtimeClassName"] = s.runtime_class_name
    labels = {**common.common_labels(spec), **common.selector_labels(spec)}
    template = {"metadata": {"labels": labels}, "spec": pod}
    template["metadata"]["annotations"] = {common.CONFIG_HASH_ANNOTATION: common.config_hash(template)}
    return template


def deployment(spec: InferenceServiceSpec) -> dict[str, Any]:
    """apps/v1 Deployment; maxSurge 0 so a rollout never needs a spare GPU node."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": common.metadata(spec, common.names(spec)["deployment"], common.COMPONENT),
        "spec": {
            "replicas": spec.desired_replicas,
            "selector": {"matchLabels": common.selector_labels(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "progressDeadlineSeconds": spec.engine.startup_timeout_seconds + 600,
            "revisionHistoryLimit": 3,
            "template": pod_template(spec),
        },
    }


def template_hash(deployment_obj: dict[str, Any]) -> str | None:
    """The config hash a Deployment's pod template carries."""
    tmpl = (deployment_obj.get("spec") or {}).get("template") or {}
    return ((tmpl.get("metadata") or {}).get("annotations") or {}).get(common.CONFIG_HASH_ANNOTATION)
