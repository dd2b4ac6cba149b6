"""Make the cluster match one InferenceService: apply children, prune, sync adapters, build status.

Scale from zero (the KEDA HTTP add-on) is rendered only where the add-on's API is served;
elsewhere the service stays at one replica and Degraded says ScaleFromZeroUnavailable.

Idempotent: every step reads before it writes, so running it again creates nothing twice. A 409 on
create adopts the existing object (patching it to the desired state) unless another controller owns
it. Only :mod:`pageant.operator.kube` talks to the API and :mod:`pageant.operator.podclient` to pods.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pageant.operator import adapters, kube, render, status
from pageant.operator.builders import common
from pageant.operator.podclient import PodClient
from pageant.operator.spec import InferenceServiceSpec


@dataclasses.dataclass
class Runtime:
    """The long-lived collaborators one operator process shares between handlers."""
    kube: kube.KubeClient
    pods: PodClient
    engine_image: str
    adapter_backoff: adapters.AdapterBackoff = dataclasses.field(default_factory=adapters.AdapterBackoff)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("pageant.operator"))


class OwnedByOther(Exception):
    """An object with a child's name exists and another controller owns it."""


def is_subset(want: Any, have: Any) -> bool:
    """Whether every field we set has that value in the live object (extra live fields are
    defaults or other controllers' business); lists compare item by item."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    if isinstance(want, (int, float)) and isinstance(have, str) or isinstance(want, str) and isinstance(have, (int, float)):
        return str(want) == str(have)
    return want == have


def removals(want: dict[str, Any], have: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """A merge patch (RFC 7386: null deletes) that drops, at each owned map's path, the keys the live
    object has and the manifest does not (e.g. a Service selector's leader label when engine.nodes
    goes back to 1). Empty when nothing is to go."""
    def at(obj: Any, path: tuple[str, ...]) -> Any:
        for key in path:
            obj = obj.get(key) if isinstance(obj, dict) else None
        return obj

    out: dict[str, Any] = {}
    for path in paths:
        w, h = at(want, path), at(have, path)
        extra = [k for k in h if k not in w] if isinstance(w, dict) and isinstance(h, dict) else []
        if extra:
            node = out
            for key in path:
                node = node.setdefault(key, {})
            node.update(dict.fromkeys(extra))
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


async def apply(client: kube.KubeClient, child: render.Child, owner_uid: str | None) -> tuple[str, dict[str, Any]]:
    """Create or patch one child; returns (action, live object)."""
    m = child.manifest
    kind, ns, name = m["kind"], m["metadata"]["namespace"], m["metadata"]["name"]
    live = await client.get(kind, ns, name)
    action = "patched"
    if live is None:
        try:
            return "created", await client.create(m)
        except kube.Conflict:  # created meanwhile (or a stale read): adopt it
            live = await client.get(kind, ns, name)
            action = "adopted"
            if live is None:
                raise kube.ServerError(409, "create", kind, "conflict, then not found; will retry")
    other = _controller_uid(live)
    if other is not None and owner_uid is not None and other != owner_uid:
        raise OwnedByOther(f"{kind} {name} exists and is controlled by another owner ({other})")
    drop = removals(m, live, child.owned_maps)
    if child.create_only or is_subset(m, live) and not drop:
        return "unchanged", live
    patched = await client.patch(kind, ns, name, _merge(m, drop) if drop else m)
    if patched is None:  # deleted between read and patch
        return "created", await client.create(m)
    return action, patched


async def prune(client: kube.KubeClient, spec: InferenceServiceSpec, wanted: set[tuple[str, str]]) -> list[str]:
    """Delete children of kinds the spec no longer wants (only ones this service controls)."""
    deleted = []
    labels = {common.INSTANCE_LABEL: spec.name, "app.kubernetes.io/managed-by": common.MANAGED_BY}
    for kind in render.PRUNABLE_KINDS:
        optional = kind in ("ScaledObject", "ServiceMonitor", "PodMonitor", "LeaderWorkerSet")
        if optional and not await client.api_available(kind):
            continue
        for obj in await client.list(kind, spec.namespace, labels):
            name = obj["metadata"]["name"]
            if (kind, name) not in wanted and _controller_uid(obj) == spec.uid and spec.uid is not None:
                if await client.delete(kind, spec.namespace, name):
                    deleted.append(f"{kind}/{name}")
    return deleted


async def retire_deployment(client: kube.KubeClient, spec: InferenceServiceSpec, lws: dict[str, Any] | None,
                            wanted: set[tuple[str, str]]) -> str | None:
    """With engine.nodes > 1, the engine's Deployment (of a former single-node spec) goes once the
    LeaderWorkerSet exists, on any pass: LWS may be installed after the switch, and resyncs do not
    prune. Until then it keeps serving (it is not pruned). Returns what it deleted."""
    name = common.names(spec)["deployment"]
    wanted.add(("Deployment", name))  # never by prune(): here, and only after its successor exists
    if lws is None or spec.uid is None:
        return None
    dep = await client.get("Deployment", spec.namespace, name)
    if dep is not None and _controller_uid(dep) == spec.uid and await client.delete("Deployment", spec.namespace, name):
        return f"Deployment/{name}"
    return None


async def reconcile(rt: Runtime, spec: InferenceServiceSpec, old_status: dict[str, Any] | None,
                    do_prune: bool = True) -> dict[str, Any]:
    """One full pass; returns the new status. Raises kube.ApiError for the caller to classify."""
    seen = status.Observed()
    wanted: set[tuple[str, str]] = set()
    wake_available = spec.wakes_from_zero and await rt.kube.api_available("InterceptorRoute")
    seen.wake = wake_available
    for child in render.children(spec, wake_available):
        wanted.add((child.kind, child.name))
        if child.optional_api and not await rt.kube.api_available(child.kind):
            seen.problems.append((f"{child.kind}APIMissing",
                                  f"{child.kind} not served by the API server ({child.optional_api}): install its CRDs"))
            continue
        try:
            action, live = await apply(rt.kube, child, spec.uid)
        except OwnedByOther as exc:
            seen.problems.append(("OwnershipConflict", str(exc)))
            continue
        if action != "unchanged":
            rt.logger.info("%s %s/%s: %s", child.kind, spec.namespace, child.name, action)
        if child.kind == "Deployment" and child.name == common.names(spec)["deployment"]:
            seen.deployment = live
        elif child.kind in ("Job", "InferencePool", "HTTPRoute", "LeaderWorkerSet"):
            setattr(seen, {"Job": "job", "InferencePool": "pool", "HTTPRoute": "route",
                           "LeaderWorkerSet": "lws"}[child.kind], live)
    if spec.wakes_from_zero and not wake_available:
        sfz = spec.autoscaling.scale_from_zero if spec.autoscaling else None
        seen.problems.append(("ScaleFromZeroUnavailable", "minReplicas 0 needs the KEDA HTTP add-on to wake the "
                              f"service (InterceptorRoute, http.keda.sh/v1beta1, not served; its interceptor "
                              f"{sfz and sfz.interceptor_namespace}/{sfz and sfz.interceptor_service}): kept at "
                              "1 replica until it is installed"))
    if spec.parallel.multinode and (gone := await retire_deployment(rt.kube, spec, seen.lws, wanted)):
        rt.logger.info("deleted %s (replaced by the LeaderWorkerSet)", gone)
    if do_prune:
        for gone in await prune(rt.kube, spec, wanted):
            rt.logger.info("pruned %s (no longer in the spec)", gone)
    pods = await rt.kube.list("Pod", spec.namespace, common.selector_labels(spec))
    seen.pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]  # not terminating
    if spec.lora_enabled:  # through the pods that serve the API (with engine.nodes > 1 the leaders)
        serving = [p for p in seen.pods if common.serves_api(spec, p)]
        result = await adapters.sync(rt.pods, rt.adapter_backoff, spec, serving)
        seen.adapter_counts, seen.adapter_errors, seen.adapter_failed = result.counts, result.errors, result.failed
    return status.compute(spec, seen, old_status)

