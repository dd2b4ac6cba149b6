"""Parse an InferenceService into typed, validated dataclasses (pure; no I/O).

The API server already enforces the CRD schema, but ``pageant operator render -f`` and old API
servers without CEL do not, so :func:`parse` re-checks the same rules and raises
:class:`InvalidSpec` with every problem found. Builders only ever see a parsed, valid spec.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pageant.operator import schema, spec_parallel
from pageant.operator.spec_ext import InferencePoolSpec, ScaleFromZeroSpec, _Reader, inference_pool, scale_from_zero
from pageant.operator.spec_parallel import ParallelSpec

DEFAULT_ENGINE_IMAGE = "ghcr.io/pageant-project/pageant-engine:0.1.0"
DEFAULT_TARGETS = {"WaitingRequests": 4.0, "RunningRequests": 16.0, "KVCacheUsage": 0.8}


class InvalidSpec(ValueError):
    """The spec breaks a rule; ``problems`` lists each one (path: message)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str | None = None
    token: SecretKeyRef | None = None


@dataclasses.dataclass(frozen=True)
class PvcSource:
    claim_name: str
    path: str = ""


@dataclasses.dataclass(frozen=True)
class CacheSource:
    hub: HubSource
    size: str
    storage_class_name: str | None = None
    access_mode: str = "ReadWriteMany"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Served name and exactly one weight source (``demo``: the model bundled in the engine image)."""
    name: str
    hub: HubSource | None = None
    pvc: PvcSource | None = None
    cache: CacheSource | None = None
    demo: bool = False


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    image: str
    image_pull_policy: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    enable_prefix_caching: bool = False
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None
    max_queued_requests: int | None = None
    shutdown_timeout_seconds: int = 30
    startup_timeout_seconds: int = 1800
    api_key: SecretKeyRef | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    """Per pod; ``gpus`` is resolved (spec_parallel.parse): as given, else the pod's ranks."""
    gpus: int = 1
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "8Gi"


@dataclasses.dataclass(frozen=True)
class SchedulingSpec:
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int
    max_replicas: int
    provider: str = "keda"
    metric: str = "WaitingRequests"
    target: float = 4.0
    query: str | None = None
    hpa_metric_name: str | None = None
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    polling_interval_seconds: int = 15
    cooldown_period_seconds: int = 300
    initial_cooldown_period_seconds: int = 900
    scale_from_zero: ScaleFromZeroSpec = ScaleFromZeroSpec()


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    name: str
    pvc: PvcSource | None = None
    hub: HubSource | None = None


@dataclasses.dataclass(frozen=True)
class MonitoringSpec:
    enabled: bool = True
    kind: str = "ServiceMonitor"
    interval: str = "15s"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class InferenceServiceSpec:
    """A parsed InferenceService: identity plus its whole desired state."""
    name: str
    namespace: str
    uid: str | None
    generation: int | None
    model: ModelSpec
    engine: EngineSpec
    resources: ResourcesSpec
    scheduling: SchedulingSpec
    replicas: int | None
    autoscaling: AutoscalingSpec | None
    adapters: tuple[AdapterSpec, ...]
    monitoring: MonitoringSpec | None
    network_policy: bool
    service_account_name: str | None
    routing: InferencePoolSpec | None = None
    parallel: ParallelSpec = ParallelSpec()

    @property
    def lora_enabled(self) -> bool:
        """LoRA is on when maxLoras is set or any adapter is listed."""
        return self.engine.max_loras is not None or bool(self.adapters)

    @property
    def wakes_from_zero(self) -> bool:
        """Scale to zero with a wake-up path: keda, minReplicas 0 and scaleFromZero not disabled."""
        a = self.autoscaling
        return a is not None and a.provider == "keda" and a.min_replicas == 0 and a.scale_from_zero.enabled

    @property
    def desired_replicas(self) -> int:
        """spec.replicas (what kubectl scale / autoscalers write); else the autoscaling floor but at
        least 1, so a scale-to-zero service starts loaded and KEDA idles it after its
        initialCooldownPeriod; else 1."""
        if self.replicas is not None:
            return self.replicas
        return max(self.autoscaling.min_replicas, 1) if self.autoscaling else 1


def _secret_ref(r: _Reader, d: dict[str, Any], key: str, path: str, default_key: str) -> SecretKeyRef | None:
    raw = r.get(d, key, dict, path)
    if raw is None:
        return None
    name = r.get(raw, "name", str, f"{path}.{key}", required=True)
    return SecretKeyRef(name or "", r.get(raw, "key", str, f"{path}.{key}", default_key))


def _hub(r: _Reader, raw: dict[str, Any], path: str) -> HubSource:
    repo = r.get(raw, "repo", str, path, required=True)
    r.pattern(repo, schema.HUB_REPO, f"{path}.repo")
    return HubSource(repo or "", r.get(raw, "revision", str, path),
                     _secret_ref(r, raw, "tokenSecretRef", path, "token"))


def _pvc(r: _Reader, raw: dict[str, Any], path: str) -> PvcSource:
    claim = r.get(raw, "claimName", str, path, required=True)
    r.pattern(claim, schema.DNS_LABEL, f"{path}.claimName")
    sub = r.get(raw, "path", str, path, "")
    if ".." in sub:  # the CEL rule RULE_NO_DOTDOT
        r.problems.append(f"{path}.path: must not contain '..'")
    return PvcSource(claim or "", sub.strip("/"))


def _one_source(r: _Reader, raw: dict[str, Any], keys: list[str], path: str) -> None:
    present = [k for k in keys if raw.get(k) is not None]
    if len(present) != 1:
        r.problems.append(f"{path}: exactly one of {keys} must be set, got {present or 'none'}")


def _model(r: _Reader, raw: dict[str, Any]) -> ModelSpec:
    p = "spec.model"
    name = r.get(raw, "name", str, p, required=True) or ""
    _one_source(r, raw, ["hub", "pvc", "cache", "demo"], p)
    demo = r.get(raw, "demo", dict, p) is not None
    hub = _hub(r, raw["hub"], f"{p}.hub") if isinstance(raw.get("hub"), dict) else None
    pvc = _pvc(r, raw["pvc"], f"{p}.pvc") if isinstance(raw.get("pvc"), dict) else None
    cache = None
    if isinstance(raw.get("cache"), dict):
        c = raw["cache"]
        access = r.get(c, "accessMode", str, f"{p}.cache", "ReadWriteMany")
        r.enum(access, ["ReadWriteMany", "ReadWriteOnce", "ReadOnlyMany"], f"{p}.cache.accessMode")
        cache = CacheSource(_hub(r, c, f"{p}.cache"), r.get(c, "size", str, f"{p}.cache", "", required=True),
                            r.get(c, "storageClassName", str, f"{p}.cache"), access)
    return ModelSpec(name, hub, pvc, cache, demo)


def _engine(r: _Reader, raw: dict[str, Any], default_image: str) -> EngineSpec:
    p = "spec.engine"
    ints = {}
    for key, low in [("maxModelLen", 1), ("maxNumSeqs", 1), ("maxNumBatchedTokens", 1),
                     ("maxLoras", 1), ("maxLoraRank", 1), ("maxCpuLoras", 1),
                     ("maxQueuedRequests", 1), ("shutdownTimeoutSeconds", 0), ("startupTimeoutSeconds", 60)]:
        ints[key] = r.get(raw, key, int, p)
        r.minimum(ints[key], low, f"{p}.{key}")
    gmu = r.get(raw, "gpuMemoryUtilization", float, p)
    r.minimum(gmu, 0, f"{p}.gpuMemoryUtilization", exclusive=True)
    if gmu is not None and gmu > 1:
        r.problems.append(f"{p}.gpuMemoryUtilization: must be <= 1")
    dtype = r.get(raw, "dtype", str, p)
    r.enum(dtype, ["auto", "float32", "bfloat16", "float16"], f"{p}.dtype")
    pull = r.get(raw, "imagePullPolicy", str, p)
    r.enum(pull, ["Always", "IfNotPresent", "Never"], f"{p}.imagePullPolicy")
    extra = r.get(raw, "extraArgs", list, p, [])
    if not all(isinstance(a, str) for a in extra):
        r.problems.append(f"{p}.extraArgs: must be strings")
    env = r.get(raw, "env", list, p, [])
    for i, e in enumerate(env):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            r.problems.append(f"{p}.env[{i}].name: required")
    return EngineSpec(
        image=r.get(raw, "image", str, p, default_image), image_pull_policy=pull,
        max_model_len=ints["maxModelLen"], max_num_seqs=ints["maxNumSeqs"],
        max_num_batched_tokens=ints["maxNumBatchedTokens"], gpu_memory_utilization=gmu, dtype=dtype,
        enable_prefix_caching=r.get(raw, "enablePrefixCaching", bool, p, False),
        max_loras=ints["maxLoras"],
        max_lora_rank=ints["maxLoraRank"], max_cpu_loras=ints["maxCpuLoras"],
        max_queued_requests=ints["maxQueuedRequests"],
        shutdown_timeout_seconds=30 if ints["shutdownTimeoutSeconds"] is None else ints["shutdownTimeoutSeconds"],
        startup_timeout_seconds=ints["startupTimeoutSeconds"] or 1800,
        api_key=_secret_ref(r, raw, "apiKeySecretRef", p, "api-key"),
        extra_args=tuple(a for a in extra if isinstance(a, str)), env=tuple(e for e in env if isinstance(e, dict)))


def _autoscaling(r: _Reader, raw: dict[str, Any]) -> AutoscalingSpec:
    p = "spec.autoscaling"
    lo = r.get(raw, "minReplicas", int, p, 1)
    hi = r.get(raw, "maxReplicas", int, p, 1, required=True)
    r.minimum(lo, 0, f"{p}.minReplicas")
    r.minimum(hi, 1, f"{p}.maxReplicas")
    provider = r.get(raw, "provider", str, p, "keda")
    r.enum(provider, ["keda", "hpa"], f"{p}.provider")
    metric = r.get(raw, "metric", str, p, "WaitingRequests")
    r.enum(metric, ["WaitingRequests", "RunningRequests", "KVCacheUsage", "Custom"], f"{p}.metric")
    target = r.get(raw, "target", float, p)
    r.minimum(target, 0, f"{p}.target", exclusive=True)
    query = r.get(raw, "query", str, p)
    hpa_name = r.get(raw, "hpaMetricName", str, p)
    # The CEL rules of schema._autoscaling, in Python.
    if lo > hi:
        r.problems.append(f"{p}: minReplicas must be <= maxReplicas ({schema.RULE_MIN_LE_MAX})")
    if metric == "Custom" and not query and provider == "keda":
        r.problems.append(f"{p}: metric Custom needs a query ({schema.RULE_CUSTOM_QUERY})")
    if provider == "hpa" and lo < 1:
        r.problems.append(f"{p}: the hpa provider cannot scale to zero: minReplicas >= 1")
    if provider == "hpa" and metric == "Custom" and not hpa_name:
        r.problems.append(f"{p}: hpa with metric Custom needs hpaMetricName")
    ints = {k: r.get(raw, k, int, p, d) for k, d in [("pollingIntervalSeconds", 15), ("cooldownPeriodSeconds", 300),
                                                      ("initialCooldownPeriodSeconds", 900)]}
    return AutoscalingSpec(
        min_replicas=lo, max_replicas=hi, provider=provider, metric=metric,
        target=target if target is not None else DEFAULT_TARGETS.get(metric, 1.0), query=query,
        hpa_metric_name=hpa_name,
        prometheus_address=r.get(raw, "prometheusAddress", str, p, AutoscalingSpec.prometheus_address),
        polling_interval_seconds=ints["pollingIntervalSeconds"],
        cooldown_period_seconds=ints["cooldownPeriodSeconds"],
        initial_cooldown_period_seconds=ints["initialCooldownPeriodSeconds"],
        scale_from_zero=scale_from_zero(r, r.get(raw, "scaleFromZero", dict, p)))


def _adapters(r: _Reader, raw: list[Any]) -> tuple[AdapterSpec, ...]:
    out, seen = [], set()
    for i, a in enumerate(raw):
        p = f"spec.adapters[{i}]"
        if not isinstance(a, dict):
            r.problems.append(f"{p}: must be an object")
            continue
        name = r.get(a, "name", str, p, required=True)
        r.pattern(name, schema.ADAPTER_NAME, f"{p}.name")
        if name in seen:
            r.problems.append(f"{p}.name: duplicate adapter {name!r}")
        seen.add(name)
        _one_source(r, a, ["pvc", "hub"], p)
        pvc = _pvc(r, a["pvc"], f"{p}.pvc") if isinstance(a.get("pvc"), dict) else None
        hub = _hub(r, a["hub"], f"{p}.hub") if isinstance(a.get("hub"), dict) else None
        out.append(AdapterSpec(name or "", pvc, hub))
    return tuple(out)


def parse(body: dict[str, Any], default_image: str = DEFAULT_ENGINE_IMAGE) -> InferenceServiceSpec:
    """Validate an InferenceService dict and return its typed spec; raise InvalidSpec."""
    r = _Reader()
    meta = body.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not re.match(schema.DNS_LABEL, name) or len(name) > 52:
        r.problems.append(f"metadata.name: {name!r} must be a DNS label of at most 52 characters")
    raw = body.get("spec")
    if not isinstance(raw, dict):
        raise InvalidSpec(r.problems + ["spec: required"])
    model_raw = r.get(raw, "model", dict, "spec", {}, required=True)
    model = _model(r, model_raw) if model_raw else ModelSpec("")
    engine_raw = r.get(raw, "engine", dict, "spec", {})
    engine = _engine(r, engine_raw, default_image)
    res_raw = r.get(raw, "resources", dict, "spec", {})
    parallel, gpus = spec_parallel.parse(r, engine_raw, res_raw)
    resources = ResourcesSpec(gpus, r.get(res_raw, "gpuResourceName", str, "spec.resources", "nvidia.com/gpu"),
                              r.get(res_raw, "cpu", str, "spec.resources"),
                              r.get(res_raw, "memory", str, "spec.resources"),
                              r.get(res_raw, "shmSize", str, "spec.resources", "8Gi"))
    sch = r.get(raw, "scheduling", dict, "spec", {})
    scheduling = SchedulingSpec(
        dict(r.get(sch, "nodeSelector", dict, "spec.scheduling", {})),
        tuple(r.get(sch, "tolerations", list, "spec.scheduling", [])),
        r.get(sch, "affinity", dict, "spec.scheduling"),
        r.get(sch, "priorityClassName", str, "spec.scheduling"),
        r.get(sch, "runtimeClassName", str, "spec.scheduling"))
    replicas = r.get(raw, "replicas", int, "spec")
    r.minimum(replicas, 0, "spec.replicas")
    auto_raw = r.get(raw, "autoscaling", dict, "spec")
    autoscaling = _autoscaling(r, auto_raw) if auto_raw is not None else None
    if autoscaling and replicas is not None and not (
            autoscaling.min_replicas <= replicas <= autoscaling.max_replicas):
        r.problems.append("spec.replicas: must lie within [autoscaling.minReplicas, autoscaling.maxReplicas]")
    spec_parallel.check_name(r, name, parallel, max(replicas or 1, autoscaling.max_replicas if autoscaling else 1))
    mon_raw = r.get(raw, "monitoring", dict, "spec")
    monitoring = None
    if mon_raw is not None and r.get(mon_raw, "enabled", bool, "spec.monitoring", True):
        kind = r.get(mon_raw, "kind", str, "spec.monitoring", "ServiceMonitor")
        r.enum(kind, ["ServiceMonitor", "PodMonitor"], "spec.monitoring.kind")
        monitoring = MonitoringSpec(True, kind, r.get(mon_raw, "interval", str, "spec.monitoring", "15s"),
                                    dict(r.get(mon_raw, "labels", dict, "spec.monitoring", {})))
    np_raw = r.get(raw, "networkPolicy", dict, "spec", {})
    spec = InferenceServiceSpec(
        name=name if isinstance(name, str) else "", namespace=namespace, uid=meta.get("uid"),
        generation=meta.get("generation"), model=model, engine=engine, resources=resources,
        scheduling=scheduling, replicas=replicas, autoscaling=autoscaling,
        adapters=_adapters(r, r.get(raw, "adapters", list, "spec", [])), monitoring=monitoring,
        network_policy=r.get(np_raw, "enabled", bool, "spec.networkPolicy", True),
        service_account_name=r.get(raw, "serviceAccountName", str, "spec"),
        routing=inference_pool(r, r.get(r.get(raw, "routing", dict, "spec", {}), "inferencePool", dict,
                                        "spec.routing"), namespace), parallel=parallel)
    if any(a.name == model.name for a in spec.adapters):
        r.problems.append("spec.adapters: an adapter cannot have the served model's name")
    if r.problems:
        raise InvalidSpec(r.problems)
    return spec
