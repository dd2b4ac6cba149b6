"""The adapters ConfigMap, and the model cache: a PVC plus the Job that fills it once."""

from __future__ import annotations

import json
from typing import Any

from pageant.operator.builders import common, workload
from pageant.operator.spec import InferenceServiceSpec

# Runs in the engine image (it has huggingface_hub); arguments come from the env, never the shell.
DOWNLOAD_SCRIPT = (
    "import os, pathlib, sys\n"
    "d = pathlib.Path(os.environ['MODEL_DIR'])\n"
    "if (d / os.environ['MARKER']).exists():\n"
    "    sys.exit(0)  # filled before (the cache outlives Job retries)\n"
    "from huggingface_hub import snapshot_download\n"
    "snapshot_download(repo_id=os.environ['MODEL_REPO'], revision=os.environ['MODEL_REVISION'], local_dir=d)\n"
    "(d / os.environ['MARKER']).write_text('ok')\n"
)


def adapters_document(spec: InferenceServiceSpec) -> str:
    """The --lora-modules-file content: {"adapters": [{"name", "path"}]}, stable order."""
    return json.dumps({"adapters": workload.adapter_entries(spec)}, indent=2, sort_keys=True) + "\n"


def adapters_config_map(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": common.metadata(spec, common.names(spec)["adapters"], "adapters"),
            "data": {common.ADAPTERS_FILE: adapters_document(spec)}}


def cache_pvc(spec: InferenceServiceSpec) -> dict[str, Any]:
    c = spec.model.cache
    if c is None:
        raise ValueError("the model cache needs spec.model.cache")
    pvc_spec: dict[str, Any] = {"accessModes": [c.access_mode], "resources": {"requests": {"storage": c.size}}}
    if c.storage_class_name:
        pvc_spec["storageClassName"] = c.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": common.metadata(spec, common.names(spec)["cache_pvc"], "model-cache"), "spec": pvc_spec}


def download_job(spec: InferenceServiceSpec) -> dict[str, Any]:
    """A Job that downloads the model into the cache PVC once and writes a marker file."""
    c = spec.model.cache
    if c is None:
        raise ValueError("the model cache needs spec.model.cache")
    env: list[dict[str, Any]] = [
        {"name": "MODEL_REPO", "value": c.hub.repo}, {"name": "MODEL_REVISION", "value": c.hub.revision or "main"},
        {"name": "MODEL_DIR", "value": workload.model_dir(spec)}, {"name": "MARKER", "value": workload.DOWNLOAD_MARKER},
        {"name": "HF_HOME", "value": "/tmp/hf"}, {"name": "HOME", "value": "/tmp"}]
    if c.hub.token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": c.hub.token.name,
                                                                       "key": c.hub.token.key}}})
    labels = {**common.common_labels(spec), "app.kubernetes.io/component": "model-download"}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": common.metadata(spec, common.names(spec)["cache_job"], "model-download"),
        # No ttlSecondsAfterFinished: the finished Job stays (owned, deleted with the service), or the
        # operator would create it again and re-check the download.
        "spec": {"backoffLimit": 6, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "restartPolicy": "OnFailure", "automountServiceAccountToken": False,
                "securityContext": common.pod_security_context(),
                "containers": [{
                    "name": "download", "image": spec.engine.image, "command": ["python", "-c", DOWNLOAD_SCRIPT],
                    "env": env,
                    "volumeMounts": [{"name": "model", "mountPath": common.MODEL_MOUNT},
                                     {"name": "tmp", "mountPath": "/tmp"}],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}}],
                "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": common.names(spec)["cache_pvc"]}},
                            {"name": "tmp", "emptyDir": {}}],
            }}},
    }
