"""Status from what the children report (pure): replicas, URL and the conditions (Ready, Progressing,
Degraded, AdaptersReady; Routed with spec.routing, from the HTTPRoute's and InferencePool's status).

With engine.nodes > 1 the workload is a LeaderWorkerSet: its status counts groups (replicas,
readyReplicas, updatedReplicas) and its UpdateInProgress condition marks a rollout, read the way a
Deployment's are; pod problems are every pod's (leaders and workers), adapters are the leaders'.

Reasons come from the Deployment's conditions and the pods' own statuses (image pull errors,
unschedulable for lack of GPUs, crash loops, model still loading) so that `kubectl get infsvc`
tells the truth without digging through pods.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from pageant.operator.builders import common, multinode, wake, workload
from pageant.operator.spec import InferenceServiceSpec

IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CRASH = {"CrashLoopBackOff", "RunContainerError", "CreateContainerConfigError", "CreateContainerError"}


@dataclasses.dataclass
class Observed:
    """What one reconciliation saw and did, beyond the children's own statuses."""
    deployment: dict[str, Any] | None = None
    lws: dict[str, Any] | None = None  # the live LeaderWorkerSet (engine.nodes > 1)
    pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    adapter_counts: dict[str, int] | None = None  # None: not measured
    adapter_errors: list[str] = dataclasses.field(default_factory=list)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (reason, message)
    job: dict[str, Any] | None = None
    adapter_failed: dict[str, str] = dataclasses.field(default_factory=dict)  # adapter -> engine's message
    wake: bool = False  # scale from zero through the KEDA HTTP add-on is in place
    pool: dict[str, Any] | None = None  # the live InferencePool (routing)
    route: dict[str, Any] | None = None  # the live HTTPRoute (routing)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | None, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "Unknown" if status is None else "True" if status else "False",
            "reason": reason, "message": message}


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]], generation: int | None
                     ) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = previous.get(c["type"])
        stamp = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        c = {**c, "lastTransitionTime": stamp or now()}
        if generation is not None:
            c["observedGeneration"] = generation
        out.append(c)
    return out


def pod_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp") or st.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def pod_problems(pods: list[dict[str, Any]], gpu_resource: str) -> list[tuple[str, str]]:
    """(reason, message) for every pod stuck on something a user must fix or wait for."""
    found: dict[str, str] = {}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        st = pod.get("status") or {}
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                msg = c.get("message", "")
                reason = "InsufficientGPU" if gpu_resource in msg else "Unschedulable"
                found.setdefault(reason, f"pod {name}: {msg}")
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in IMAGE_PULL:
                found.setdefault("ImagePullError", f"pod {name}: {reason}: {waiting.get('message', '')}".strip())
            elif reason in CRASH:
                last = ((cs.get("lastState") or {}).get("terminated") or {})
                detail = f" (last exit {last.get('exitCode')}: {last.get('reason', '')})" if last else ""
                found.setdefault("CrashLoop", f"pod {name}: {reason}{detail}")
    return sorted(found.items())


def workload_of(spec: InferenceServiceSpec, seen: Observed) -> tuple[str, dict[str, Any] | None, str | None]:
    """(kind, live object, the config hash its pod template should carry) of the engine's workload."""
    if spec.parallel.multinode:
        return multinode.KIND, seen.lws, multinode.template_hash(multinode.leader_worker_set(spec))
    return "Deployment", seen.deployment, workload.template_hash(workload.deployment(spec))


def compute(spec: InferenceServiceSpec, seen: Observed, old_status: dict[str, Any] | None) -> dict[str, Any]:
    """The full status object for a valid spec."""
    kind, live, config_hash = workload_of(spec, seen)
    dep = live or {}
    dst = dep.get("status") or {}
    desired = spec.desired_replicas
    ready_pods = [p for p in seen.pods if pod_ready(p) and common.serves_api(spec, p)]
    ready = int(dst.get("readyReplicas") or 0)
    replicas = int(dst.get("replicas") or 0)
    updated = int(dst.get("updatedReplicas") or 0)
    dep_conditions = {c.get("type"): c for c in dst.get("conditions") or []}
    rolled = (dep.get("metadata") or {}).get("generation") in (None, dst.get("observedGeneration")) \
        and (dep_conditions.get("UpdateInProgress") or {}).get("status") != "True"  # a LeaderWorkerSet's
    problems = list(seen.problems) + pod_problems(seen.pods, spec.resources.gpu_resource_name)
    progressing_c = dep_conditions.get("Progressing") or {}
    if progressing_c.get("status") == "False" and progressing_c.get("reason") == "ProgressDeadlineExceeded":
        problems.append(("ProgressDeadlineExceeded", progressing_c.get("message", "rollout stalled")))
    job_st = (seen.job or {}).get("status") or {}
    if seen.job is not None and any(c.get("type") == "Failed" and c.get("status") == "True"
                                    for c in job_st.get("conditions") or []):
        problems.append(("ModelDownloadFailed", f"Job {seen.job['metadata']['name']} failed"))

    api_missing = [p for p in problems if p[0] == f"{kind}APIMissing"]
    if live is None and api_missing:
        ready_c = condition("Ready", False, *api_missing[0])
    elif live is None:
        ready_c = condition("Ready", False, f"{kind}Missing", f"the {kind} does not exist yet")
    elif ready > 0:
        ready_c = condition("Ready", True, "AllReplicasReady" if ready >= desired else "PartiallyReady",
                            f"{ready}/{desired} replicas ready")
    elif desired == 0:
        ready_c = condition("Ready", False, "ScaledToZero", "no replicas: scaled to zero")
    elif problems:
        ready_c = condition("Ready", False, problems[0][0], problems[0][1])
    elif seen.job is not None and not job_st.get("succeeded"):
        ready_c = condition("Ready", False, "ModelDownloading", "the model cache is being filled")
    else:
        ready_c = condition("Ready", False, "ModelLoading", f"0/{desired} replicas ready (loading the model)")

    converged = live is not None and rolled and updated >= desired and ready >= desired \
        and replicas == desired
    if converged:
        prog_c = condition("Progressing", False, "Stable", f"{ready}/{desired} replicas ready and up to date")
    elif any(r == "ProgressDeadlineExceeded" for r, _ in problems):
        prog_c = condition("Progressing", False, "ProgressDeadlineExceeded", progressing_c.get("message", ""))
    else:
        reason = "RollingOut" if updated < replicas or not rolled else "Scaling"
        prog_c = condition("Progressing", True, reason,
                           f"{ready}/{desired} ready, {updated} up to date, {replicas} exist")

    if problems:
        degraded_c = condition("Degraded", True, problems[0][0], "; ".join(m for _, m in problems))
    else:
        degraded_c = condition("Degraded", False, "AsExpected", "no problems reported")

    counts = seen.adapter_counts or {}
    adapters = [adapter_status(a.name, counts.get(a.name, 0), len(ready_pods), seen) for a in spec.adapters]
    if not spec.adapters:
        adapters_c = condition("AdaptersReady", True, "NoAdapters", "no adapters requested")
    elif not ready_pods or seen.adapter_counts is None:
        adapters_c = condition("AdaptersReady", None, "NoReadyReplicas", "no ready replica to load adapters into")
    else:
        missing = [f"{a['name']} ({a['readyReplicas']}/{len(ready_pods)})" for a in adapters
                   if a["readyReplicas"] < len(ready_pods)]
        if missing:
            detail = "; ".join(seen.adapter_errors)
            adapters_c = condition("AdaptersReady", False, "AdaptersLoading",
                                   "not on every ready replica: " + ", ".join(missing) + (f"; {detail}" if detail else ""))
        else:
            adapters_c = condition("AdaptersReady", True, "AllAdaptersLoaded",
                                   f"{len(adapters)} adapters on all {len(ready_pods)} ready replicas")

    old = (old_status or {}).get("conditions")
    return {
        "observedGeneration": spec.generation,
        "replicas": replicas, "readyReplicas": ready, "desiredReplicas": desired,
        "selector": common.selector_string(spec), "url": wake.url(spec) if seen.wake else common.url(spec), "model": spec.model.name,
        "configHash": config_hash,
        "adapters": adapters,
        "conditions": merge_conditions(old, [ready_c, prog_c, degraded_c, adapters_c]
                                       + ([routed(spec, seen)] if spec.routing is not None else []), spec.generation),
    }


def adapter_status(name: str, count: int, ready: int, seen: Observed) -> dict[str, Any]:
    """One adapter: Loaded on every ready replica, Failed (the engine's message) where a load
    failed, else Pending (nothing measured or no ready replica) or Loading."""
    out: dict[str, Any] = {"name": name, "readyReplicas": count}
    if name in seen.adapter_failed:
        out.update(state="Failed", message=seen.adapter_failed[name])
    elif seen.adapter_counts is None or ready == 0:
        out["state"] = "Pending"
    else:
        out["state"] = "Loaded" if count >= ready else "Loading"
    return out


PARENT_CONDITIONS = {"Accepted": "NotAccepted", "ResolvedRefs": "RefsNotResolved"}


def routed(spec: InferenceServiceSpec, seen: Observed) -> dict[str, Any]:
    """Routed from the HTTPRoute's and the InferencePool's own status.parents conditions: True once
    both are Accepted with ResolvedRefs, False (reason e.g. HTTPRouteNotAccepted) when a Gateway
    refuses one, Unknown while no Gateway controller has written status."""
    for kind, obj in (("HTTPRoute", seen.route), ("InferencePool", seen.pool)):
        if obj is None:
            return condition("Routed", False, f"{kind}Missing", f"the {kind} does not exist (is its CRD installed?)")
        parents = (obj.get("status") or {}).get("parents") or []
        if not parents:
            return condition("Routed", None, "Pending", f"{kind} {obj['metadata']['name']}: no status from a Gateway yet")
        for parent in parents:
            conds = {c.get("type"): c for c in parent.get("conditions") or []}
            for type_, bad in PARENT_CONDITIONS.items():
                c = conds.get(type_)
                if c is None:
                    return condition("Routed", None, "Pending", f"{kind}: no {type_} condition yet")
                if c.get("status") != "True":
                    return condition("Routed", False, f"{kind}{bad}",
                                     f"{kind} {obj['metadata']['name']}: {type_}={c.get('status')} "
                                     f"{c.get('reason', '')}: {c.get('message', '')}".strip())
    gw = spec.routing
    return condition("Routed", True, "Accepted", f"HTTPRoute and InferencePool accepted by Gateway "
                     f"{gw.gateway_namespace}/{gw.gateway_name}" if gw else "accepted")


def invalid(generation: int | None, message: str, old_status: dict[str, Any] | None) -> dict[str, Any]:
    """Status for a spec that breaks the rules: Ready=False/InvalidSpec, nothing else touched."""
    conds = [condition("Ready", False, "InvalidSpec", message),
             condition("Degraded", True, "InvalidSpec", message)]
    old = (old_status or {}).get("conditions") or []
    kept = [c for c in old if c.get("type") not in ("Ready", "Degraded")]
    return {"observedGeneration": generation,
            "conditions": kept + merge_conditions(old, conds, generation)}
