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
    if child.create_only or is_subset(m, live):
        return "unchanged", live
    patched = await client.patch(kind, ns, name, m)
    if patched is None:  # deleted between read and patch
        return "created", await client.create(m)
    return action, patched


async def prune(client: kube.KubeClient, spec: InferenceServiceSpec, wanted: set[tuple[str, str]]) -> list[str]:
    """Delete children of kinds the spec no longer wants (only ones this service controls)."""
    deleted = []
    labels = {common.INSTANCE_LABEL: spec.name, "app.kubernetes.io/managed-by": common.MANAGED_BY}
    for kind in render.PRUNABLE_KINDS:
        if kind in ("ScaledObject", "ServiceMonitor", "PodMonitor") and not await client.api_available(kind):
            continue
        for obj in await client.list(kind, spec.namespace, labels):
            name = obj["metadata"]["name"]
            if (kind, name) not in wanted and _controller_uid(obj) == spec.uid and spec.uid is not None:
                if await client.delete(kind, spec.namespace, name):
                    deleted.append(f"{kind}/{name}")
    return deleted


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
        elif child.kind in ("Job", "InferencePool", "HTTPRoute"):
            setattr(seen, {"Job": "job", "InferencePool": "pool", "HTTPRoute": "route"}[child.kind], live)
    if spec.wakes_from_zero and not wake_available:
        sfz = spec.autoscaling.scale_from_zero if spec.autoscaling else None
        seen.problems.append(("ScaleFromZeroUnavailable", "minReplicas 0 needs the KEDA HTTP add-on to wake the "
                              f"service (InterceptorRoute, http.keda.sh/v1beta1, not served; its interceptor "
                              f"{sfz and sfz.interceptor_namespace}/{sfz and sfz.interceptor_service}): kept at "
                              "1 replica until it is installed"))
    if do_prune:
        for gone in await prune(rt.kube, spec, wanted):
            rt.logger.info("pruned %s (no longer in the spec)", gone)
    pods = await rt.kube.list("Pod", spec.namespace, common.selector_labels(spec))
    seen.pods = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]  # not terminating
    if spec.lora_enabled:
        result = await adapters.sync(rt.pods, rt.adapter_backoff, spec, seen.pods)
        seen.adapter_counts, seen.adapter_errors, seen.adapter_failed = result.counts, result.errors, result.failed
    return status.compute(spec, seen, old_status)

