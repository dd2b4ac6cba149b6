"""The InferenceService CustomResourceDefinition: the one place its schema is written down.

`crds/pageant.dev_inferenceservices.yaml` is generated from :func:`crd` (``pageant crd``); a test
fails when the two drift. The schema is *structural* (every field typed) so the API server can
prune and default it, and it rejects on its own what it can: required fields, enums, ranges,
exactly one model source (``oneOf`` of ``required``), and the cross-field rules as CEL
(``x-kubernetes-validations``). :mod:`pageant.operator.spec` re-checks the CEL rules in Python
because ``kubectl apply`` against an old API server, or ``pageant operator render``, skips them.
"""

from __future__ import annotations

import copy
from typing import Any

from pageant.operator import schema_parallel

GROUP = "pageant.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["infsvc"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ADAPTER_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"  # a Go duration, e.g. 30m or 1h30m
HUB_REPO = r"^[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?$"

# CEL rules (message -> rule) kept as data so the Python re-check in spec.py can name them.
RULE_NO_DOTDOT = "!has(self.path) || !self.path.contains('..')"
RULE_MIN_LE_MAX = "self.minReplicas <= self.maxReplicas"
RULE_CUSTOM_QUERY = "self.metric != 'Custom' || self.provider == 'hpa' || has(self.query)"
RULE_HPA_MIN = "self.provider != 'hpa' || self.minReplicas >= 1"
RULE_HPA_CUSTOM_NAME = "self.provider != 'hpa' || self.metric != 'Custom' || has(self.hpaMetricName)"
RULE_REPLICAS_XOR_AUTOSCALING = "!has(self.autoscaling) || !has(self.replicas) || " \
    "(self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)"


def _s(description: str, **kw: Any) -> dict[str, Any]:
    if "enum" in kw and "maxLength" not in kw:  # bounded strings keep CEL cost estimates low
        kw["maxLength"] = max(len(e) for e in kw["enum"])
    return {"type": "string", "description": description, **kw}


def _i(description: str, minimum: int | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "format": "int32", "description": description, **kw}
    if minimum is not None:
        out["minimum"] = minimum
    return out


def _b(description: str, **kw: Any) -> dict[str, Any]:
    return {"type": "boolean", "description": description, **kw}


def _obj(description: str, properties: dict[str, Any], required: list[str] | None = None,
         **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": description, "properties": properties}
    if required:
        out["required"] = required
    out.update(kw)
    return out


def _quantity(description: str) -> dict[str, Any]:
    return {"description": description, "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}


def _free_object(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def _secret_key_ref(description: str, default_key: str) -> dict[str, Any]:
    return _obj(description, {
        "name": _s("Secret name (same namespace).", minLength=1),
        "key": _s("Key inside the Secret.", default=default_key, minLength=1),
    }, required=["name"])


def _hub(description: str) -> dict[str, Any]:
    return _obj(description, {
        "repo": _s("Hugging Face Hub repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct.", pattern=HUB_REPO,
                   maxLength=256),
        "revision": _s("Branch, tag or commit (default: main).", minLength=1),
        "tokenSecretRef": _secret_key_ref("Secret holding a Hub token (for gated/private repos); "
                                          "passed to the engine as HF_TOKEN.", "token"),
    }, required=["repo"])


def _pvc_path(description: str) -> dict[str, Any]:
    return _obj(description, {
        "claimName": _s("PersistentVolumeClaim name (same namespace); mounted read-only.", pattern=DNS_LABEL,
                        maxLength=253),
        "path": _s("Directory inside the volume (default: its root); no `..`.", default="", maxLength=1024),
    }, required=["claimName"], **{"x-kubernetes-validations": [
        {"rule": RULE_NO_DOTDOT, "message": "path must not contain '..'"}]})


def _model() -> dict[str, Any]:
    cache = _hub("Download from the Hub once into a PVC the operator creates (a Job fills it), then "
                 "mount it read-only in every replica: no per-pod download, fast restarts.")
    cache["properties"].update({
        "size": _quantity("Size of the cache PVC, e.g. 40Gi."),
        "storageClassName": _s("StorageClass of the cache PVC (default: the cluster's default)."),
        "accessMode": _s("Access mode of the cache PVC: ReadWriteMany lets replicas on different "
                         "nodes share it.", enum=["ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany"],
                         default="ReadWriteMany"),
    })
    cache["required"] = ["repo", "size"]
    return _obj("The model to serve and where its weights come from (exactly one of hub, pvc, cache, demo).", {
        "name": _s("Served model name: the `model` field clients send.", minLength=1, maxLength=128),
        "hub": _hub("Download from the Hugging Face Hub at start into the pod's cache."),
        "pvc": _pvc_path("Weights already on a PersistentVolumeClaim."),
        "cache": cache,
        "demo": _obj("The demo model inside the engine image (`demo: {}`): a 3.8M-parameter Llama that "
                     "runs on CPU, for trying the operator without GPUs or downloads.", {}),
    }, required=["name"], oneOf=[{"required": ["hub"]}, {"required": ["pvc"]}, {"required": ["cache"]},
                                 {"required": ["demo"]}],
        **{"x-kubernetes-validations": [{
            "rule": "[has(self.hub), has(self.pvc), has(self.cache), has(self.demo)].filter(x, x).size() == 1",
            "message": "exactly one model source (hub, pvc, cache, demo) must be set"}]})


def _engine() -> dict[str, Any]:
    return _obj("The engine container and its knobs (become `pageant serve` flags).", {
        "image": _s("Engine image (default: the operator's --engine-image).", minLength=1),
        "imagePullPolicy": _s("Image pull policy.", enum=["Always", "IfNotPresent", "Never"]),
        "maxModelLen": _i("--max-model-len: longest context.", 1),
        "maxNumSeqs": _i("--max-num-seqs: sequences per batch.", 1),
        "maxNumBatchedTokens": _i("--max-num-batched-tokens: tokens per step.", 1),
        "gpuMemoryUtilization": {"type": "number", "description": "--gpu-memory-utilization (0, 1].",
                                 "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "dtype": _s("--dtype.", enum=["auto", "float32", "bfloat16", "float16"]),
        "enablePrefixCaching": _b("--enable-prefix-caching."),
        **schema_parallel.engine_properties(),
        "maxLoras": _i("--max-loras: adapters in one batch. Setting it enables LoRA even with no "
                       "adapters yet, so that adding the first one later needs no restart.", 1),
        "maxLoraRank": _i("--max-lora-rank.", 1),
        "maxCpuLoras": _i("--max-cpu-loras.", 1),
        "maxQueuedRequests": _i("--max-queued-requests: beyond it requests get 429.", 1),
        "shutdownTimeoutSeconds": _i("--shutdown-timeout: how long a stopping replica finishes "
                                     "in-flight requests.", 0, default=30),
        "startupTimeoutSeconds": _i("Budget for loading the model before the startup probe gives up.",
                                    60, default=1800),
        "apiKeySecretRef": _secret_key_ref("Secret holding the API key clients must send.", "api-key"),
        "extraArgs": {"type": "array", "description": "Extra `pageant serve` arguments.",
                      "items": {"type": "string"}},
        "env": {"type": "array", "description": "Extra environment variables (core EnvVar).",
                "items": _obj("EnvVar", {"name": _s("Name.", minLength=1), "value": _s("Value."),
                                         "valueFrom": _free_object("EnvVarSource.")},
                              required=["name"])},
    }, **{"x-kubernetes-validations": schema_parallel.engine_rules()})


def _resources() -> dict[str, Any]:
    return _obj("Per-pod resources (a replica spans engine.nodes pods).", {
        "gpus": _i(schema_parallel.GPUS_DESCRIPTION, 0),
        "gpuResourceName": _s("Extended resource name of the GPU.", default="nvidia.com/gpu", minLength=1),
        "cpu": _quantity("CPU request (and limit)."),
        "memory": _quantity("Memory request and limit."),
        "shmSize": _quantity("Size of the memory-backed /dev/shm (default 8Gi)."),
    })


def _scheduling() -> dict[str, Any]:
    return _obj("Where replicas may run.", {
        "nodeSelector": {"type": "object", "description": "Node labels.",
                         "additionalProperties": {"type": "string"}},
        "tolerations": {"type": "array", "description": "Tolerations (core Toleration).",
                        "items": _obj("Toleration", {
                            "key": _s("Key."), "operator": _s("Operator.", enum=["Exists", "Equal"]),
                            "value": _s("Value."),
                            "effect": _s("Effect.", enum=["NoSchedule", "PreferNoSchedule", "NoExecute"]),
                            "tolerationSeconds": {"type": "integer", "format": "int64",
                                                  "description": "Seconds."}})},
        "affinity": _free_object("Affinity (core Affinity)."),
        "priorityClassName": _s("PriorityClass."),
        "runtimeClassName": _s("RuntimeClass, e.g. nvidia."),
    })


def _autoscaling() -> dict[str, Any]:
    return _obj("Autoscale between minReplicas and maxReplicas on an engine signal.", {
        "minReplicas": _i("Fewest replicas; 0 scales to zero when idle (keda only).", 0, default=1),
        "maxReplicas": _i("Most replicas.", 1),
        "provider": _s("keda: a ScaledObject with a Prometheus trigger; hpa: an autoscaling/v2 "
                       "HPA on a per-pod metric served by prometheus-adapter.",
                       enum=["keda", "hpa"], default="keda"),
        "metric": _s("The signal: WaitingRequests (queue length per replica), RunningRequests, "
                     "KVCacheUsage (fraction per replica) or Custom (your PromQL `query`).",
                     enum=["WaitingRequests", "RunningRequests", "KVCacheUsage", "Custom"],
                     default="WaitingRequests"),
        "target": {"description": "Target value of the signal per replica (default: 4 waiting, "
                                  "16 running, 0.8 KV-cache usage).",
                   "type": "number", "exclusiveMinimum": True, "minimum": 0},
        "query": _s("PromQL for metric=Custom (keda): its value divided by target is the "
                    "replica count.", minLength=1, maxLength=4096),
        "hpaMetricName": _s("Per-pod metric name in the custom metrics API (hpa). Default: the "
                            "prometheus-adapter name of the signal, e.g. vllm_num_requests_waiting.",
                            maxLength=253),
        "prometheusAddress": _s("Prometheus base URL for keda.",
                                default="http://prometheus-operated.monitoring.svc:9090"),
        "pollingIntervalSeconds": _i("How often keda queries Prometheus.", 1, default=15),
        "cooldownPeriodSeconds": _i("Idle time before scaling to zero (keda).", 0, default=300),
        "initialCooldownPeriodSeconds": _i("Grace after creation before keda may scale to zero: "
                                           "long enough to load the model.", 0, default=900),
        "scaleFromZero": _scale_from_zero(),
    }, required=["maxReplicas"], **{"x-kubernetes-validations": [
        {"rule": RULE_MIN_LE_MAX, "message": "minReplicas must be <= maxReplicas"},
        {"rule": RULE_CUSTOM_QUERY, "message": "metric Custom needs a query"},
        {"rule": RULE_HPA_MIN, "message": "the hpa provider cannot scale to zero: minReplicas >= 1"},
        {"rule": RULE_HPA_CUSTOM_NAME, "message": "hpa with metric Custom needs hpaMetricName"},
    ]})


def _scale_from_zero() -> dict[str, Any]:
    def duration(description: str, **kw: Any) -> dict[str, Any]:
        return _s(description, pattern=DURATION, maxLength=32, **kw)
    return _obj("With provider keda and minReplicas 0: wake from zero through the KEDA HTTP add-on. Its "
                "interceptor holds requests that arrive at zero and its pending-request count activates "
                "the service; the engine metrics still scale it between 1 and maxReplicas. Without the "
                "add-on the service is kept at 1 and Degraded says ScaleFromZeroUnavailable.", {
        "enabled": _b("Use the add-on (false: idle to zero with no wake-up path).", default=True),
        "interceptorService": _s("The add-on's interceptor proxy Service.",
                                 default="keda-add-ons-http-interceptor-proxy", minLength=1),
        "interceptorNamespace": _s("Namespace of the add-on.", default="keda", minLength=1),
        "interceptorPort": _i("Port of the interceptor proxy Service.", 1, default=8080),
        "scalerAddress": _s("The add-on's external scaler (host:port) for KEDA's external-push trigger.",
                            default="keda-add-ons-http-external-scaler.keda:9090", minLength=1),
        "targetConcurrency": _i("Requests in flight per replica at the interceptor before it asks "
                                "for another replica (the engine metrics usually ask first).", 1, default=100),
        "timeouts": _obj("The interceptor's timeouts for this service (Go durations).", {
            "readiness": duration("How long a request waits for a replica to become ready (a cold "
                                  "start: scheduling, image pull, model load). Default: "
                                  "engine.startupTimeoutSeconds plus 2 minutes."),
            "request": duration("Whole-request budget, cold start included. Default: readiness plus "
                                "10 minutes."),
            "responseHeader": duration("Wait for response headers once the request is sent (not "
                                       "counting the cold start).", default="300s"),
        }),
    })


def _routing() -> dict[str, Any]:
    return _obj("Routing through a Gateway (Gateway API Inference Extension).", {
        "inferencePool": _obj("An InferencePool of the engine pods, its endpoint picker (prefix-cache, "
                              "queue-depth, KV-cache and LoRA-affinity aware) and an HTTPRoute from "
                              "the Gateway to the pool.", {
            "enabled": _b("Create them.", default=False),
            "gateway": _obj("The Gateway the HTTPRoute attaches to.", {
                "name": _s("Gateway name.", pattern=DNS_SUBDOMAIN, maxLength=253),
                "namespace": _s("Gateway namespace (default: the service's).", pattern=DNS_LABEL, maxLength=63),
                "sectionName": _s("Listener name on the Gateway (default: all).", minLength=1, maxLength=253),
            }, required=["name"]),
            "eppImage": _s("Endpoint picker image.", minLength=1),
            "eppReplicas": _i("Endpoint picker replicas.", 1, default=1),
            "failureMode": _s("What the Gateway does when the picker does not answer.",
                              enum=["FailClose", "FailOpen"], default="FailClose"),
        }, **{"x-kubernetes-validations": [{"rule": "!self.enabled || has(self.gateway)",
                                              "message": "enabled needs a gateway"}]}),
    })


def _adapters() -> dict[str, Any]:
    item = _obj("A LoRA adapter (exactly one of pvc, hub).", {
        "name": _s("Adapter name: the `model` clients send to use it.", pattern=ADAPTER_NAME, maxLength=128),
        "pvc": _pvc_path("Adapter files on a PVC. Adapters on a claim already mounted go live "
                         "without restarts; a new claim adds a volume and so rolls the pods."),
        "hub": _hub("Adapter on the Hugging Face Hub (the engine downloads it)."),
    }, required=["name"], oneOf=[{"required": ["pvc"]}, {"required": ["hub"]}])
    return {"type": "array", "description": "LoRA adapters; loaded and unloaded live in every replica.",
            "items": item, "maxItems": 256, "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"]}


def _monitoring() -> dict[str, Any]:
    return _obj("Prometheus Operator scrape config (created only if its CRDs exist).", {
        "enabled": _b("Create a monitor.", default=True),
        "kind": _s("Which monitor.", enum=["ServiceMonitor", "PodMonitor"], default="ServiceMonitor"),
        "interval": _s("Scrape interval.", default="15s", pattern=r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"),
        "labels": {"type": "object", "description": "Extra labels (to match your Prometheus' selector).",
                   "additionalProperties": {"type": "string"}},
    })


def _spec() -> dict[str, Any]:
    return _obj("Desired state of the InferenceService.", {
        "model": _model(),
        "engine": _engine(),
        "resources": _resources(),
        "scheduling": _scheduling(),
        "replicas": _i("Fixed replica count (also what `kubectl scale` and autoscalers set); with "
                       "engine.nodes > 1 a replica is a group of that many pods.", 0),
        "autoscaling": _autoscaling(),
        "adapters": _adapters(),
        "monitoring": _monitoring(),
        "networkPolicy": _obj("NetworkPolicy admitting only the API port.", {
            "enabled": _b("Create it.", default=True)}),
        "serviceAccountName": _s("ServiceAccount of the pods."),
        "routing": _routing(),
    }, required=["model"], **{"x-kubernetes-validations": [
        {"rule": RULE_REPLICAS_XOR_AUTOSCALING,
         "message": "replicas must lie within [autoscaling.minReplicas, autoscaling.maxReplicas]"},
        *schema_parallel.spec_rules(),
    ]})


def _condition() -> dict[str, Any]:
    return _obj("A status condition.", {
        "type": _s("Ready, Progressing, Degraded, AdaptersReady or Routed."),
        "status": _s("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": _s("CamelCase reason."),
        "message": _s("Human-readable detail."),
        "lastTransitionTime": _s("When status last changed.", format="date-time"),
        "observedGeneration": {"type": "integer", "format": "int64", "description": "Generation seen."},
    }, required=["type", "status"])


def _status() -> dict[str, Any]:
    return _obj("Observed state, written by the operator.", {
        "observedGeneration": {"type": "integer", "format": "int64", "description": "Last generation reconciled."},
        "replicas": _i("Replicas that exist (scale subresource)."),
        "readyReplicas": _i("Replicas ready to serve."),
        "desiredReplicas": _i("Replicas wanted now."),
        "selector": _s("Label selector of the replicas (scale subresource, for HPA)."),
        "url": _s("In-cluster OpenAI-compatible base URL (with scale from zero: the address that "
                  "wakes the service, through the KEDA HTTP add-on's interceptor)."),
        "model": _s("Served model name."),
        "configHash": _s("Hash of the rendered pod template."),
        "adapters": {"type": "array", "description": "Per adapter, how many ready replicas serve it.",
                     "items": _obj("Adapter status.", {
                         "name": _s("Adapter name."), "readyReplicas": _i("Replicas serving it."),
                         "state": _s("Loaded, Loading, Pending or Failed (retried with backoff).",
                                     enum=["Loaded", "Loading", "Pending", "Failed"]),
                         "message": _s("Why it failed: the engine's message.")})},
        "conditions": {"type": "array", "items": _condition(), "description": "Conditions.",
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    })


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the one served version (a fresh copy each call)."""
    return copy.deepcopy({
        "type": "object",
        "description": "An LLM served by Pageant engine replicas.",
        "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _spec(),
            "status": _status(),
        },
        "required": ["spec"],
    })


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Ready-Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
    {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 0},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "pageant"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": SINGULAR, "shortNames": list(SHORT_NAMES), "categories": ["pageant"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {"status": {}, "scale": {
                    "specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas",
                    "labelSelectorPath": ".status.selector"}},
                "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
            }],
        },
    }
