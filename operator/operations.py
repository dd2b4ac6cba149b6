"""What each kopf handler does, with the error policy in one place.

- InvalidSpec: status Ready=False/InvalidSpec, a Warning Event, kopf.PermanentError (no hot loop:
  kopf waits for the next spec change).
- 403 Forbidden: shown in status (Degraded=True/Forbidden, naming the verb and kind), retried slowly.
- 5xx / unreachable API server: kopf.TemporaryError with exponential backoff.
The periodic resync (drift, status, adapters) never raises: it tries again on its next tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from pageant.operator import kube, reconcile, spec as spec_mod, status
from pageant.operator.config import OperatorConfig
from pageant.operator.metrics import OperatorMetrics

FORBIDDEN_RETRY_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 60.0


def backoff(retry: int) -> float:
    return min(2.0 ** max(retry, 0), MAX_BACKOFF_SECONDS)


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: standalone (no peering), our own annotation/finalizer names, quiet events."""
    settings.peering.standalone = True
    settings.persistence.finalizer = "pageant.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pageant.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pageant.dev", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.background.instant_exit_timeout = 5.0  # let an in-flight resync finish on shutdown
    # --namespace takes exact names: watch just those, without listing namespaces cluster-wide
    # (no cluster-scoped namespace RBAC needed). The CRD must exist when the operator starts.
    settings.scanning.disabled = bool(config.namespaces)
    settings.networking.request_timeout = config.api_timeout_seconds
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def login(config: OperatorConfig, rt: reconcile.Runtime, **kwargs: Any) -> Any:
    """Credentials for kopf and for our own client: fixed (tests), in-cluster, or kubeconfig."""
    info = config.connection or kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig found")
    rt.kube.set_connection(info)
    return info


async def cleanup(rt: reconcile.Runtime) -> None:
    await rt.kube.close()
    await rt.pods.close()


def _lock(memo: Any) -> asyncio.Lock:
    """One reconciliation at a time per InferenceService (spec handlers and the resync timer)."""
    lock = memo.get("pageant_lock")
    if lock is None:
        lock = memo["pageant_lock"] = asyncio.Lock()
    return lock


def _forbidden_status(old: dict[str, Any] | None, generation: int | None, message: str) -> dict[str, Any]:
    old_conditions = (old or {}).get("conditions") or []
    kept = [c for c in old_conditions if c.get("type") != "Degraded"]
    new = status.merge_conditions(old_conditions, [status.condition("Degraded", True, "Forbidden", message)],
                                  generation)
    return {"conditions": kept + new}


def _count_failure(metrics: OperatorMetrics, handler: str, exc: Exception) -> None:
    """Count a failed reconcile: API errors are retried (``forbidden``, ``unreachable`` or
    ``api_error``), anything else is a bug (``unexpected``)."""
    if isinstance(exc, kube.ApiError):
        metrics.reconciliations.labels(handler, "retry").inc()
        kind = ("forbidden" if isinstance(exc, kube.Forbidden)
                else "unreachable" if isinstance(exc, kube.Unreachable) else "api_error")
    else:
        metrics.reconciliations.labels(handler, "error").inc()
        kind = "unexpected"
    metrics.errors.labels(handler, kind).inc()


async def on_change(handler: str, body: kopf.Body, patch: kopf.Patch, memo: Any, retry: int,
                    rt: reconcile.Runtime, metrics: OperatorMetrics) -> None:
    """create / update / resume: reconcile now; raise kopf errors per the policy above."""
    meta = body.get("metadata") or {}
    metrics.track(meta.get("namespace", ""), meta.get("name", ""), True)
    old = dict(body.get("status") or {})
    with metrics.timed(handler):
        try:
            spec = spec_mod.parse(dict(body), rt.engine_image)
        except spec_mod.InvalidSpec as exc:
            metrics.reconciliations.labels(handler, "invalid").inc()
            metrics.errors.labels(handler, "invalid_spec").inc()
            patch["status"] = status.invalid(meta.get("generation"), str(exc), old)
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc
        try:
            async with _lock(memo):
                patch["status"] = await reconcile.reconcile(rt, spec, old)
        except kube.Forbidden as exc:
            _count_failure(metrics, handler, exc)
            patch["status"] = _forbidden_status(old, spec.generation, str(exc))
            kopf.warn(body, reason="Forbidden", message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=FORBIDDEN_RETRY_SECONDS) from exc
        except kube.ApiError as exc:
            _count_failure(metrics, handler, exc)
            raise kopf.TemporaryError(str(exc), delay=backoff(retry)) from exc
        except Exception as exc:
            _count_failure(metrics, handler, exc)
            raise
    metrics.reconciliations.labels(handler, "success").inc()


async def on_resync(body: kopf.Body, patch: kopf.Patch, memo: Any, logger: Any,
                    rt: reconcile.Runtime, metrics: OperatorMetrics) -> None:
    """The periodic pass: repair drift, refresh status, converge adapters. Never raises.

    It reads each child and the pods (a handful of API calls per service per period); pruning
    children the spec dropped is left to the spec-change handlers, which are what drop them."""
    handler = "resync"
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return
    old = dict(body.get("status") or {})
    with metrics.timed(handler):
        try:
            spec = spec_mod.parse(dict(body), rt.engine_image)
        except spec_mod.InvalidSpec as exc:
            metrics.reconciliations.labels(handler, "invalid").inc()
            new = status.invalid(meta.get("generation"), str(exc), old)
            if new["conditions"] != old.get("conditions"):
                patch["status"] = new
            return
        try:
            async with _lock(memo):
                new = await reconcile.reconcile(rt, spec, old, do_prune=False)
        except kube.Forbidden as exc:
            _count_failure(metrics, handler, exc)
            patch["status"] = _forbidden_status(old, spec.generation, str(exc))
            return
        except kube.ApiError as exc:
            _count_failure(metrics, handler, exc)
            logger.warning("resync failed, retrying on the next tick: %s", exc)
            return
        except Exception as exc:  # a bug: report, keep the timer alive
            _count_failure(metrics, handler, exc)
            logger.exception("resync failed unexpectedly: %s", exc)
            return
    metrics.reconciliations.labels(handler, "success").inc()
    if _differs(new, old):
        patch["status"] = new


def _differs(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Skip no-op status writes (timestamps aside) so an idle service causes no API traffic."""
    def strip(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                    for c in s.get("conditions") or []]}
    return strip(new) != strip({k: old.get(k) for k in new})


def on_delete(body: kopf.Body, metrics: OperatorMetrics) -> None:
    """Children go with their owner (ownerReferences): nothing to delete, just stop counting."""
    meta = body.get("metadata") or {}
    metrics.track(meta.get("namespace", ""), meta.get("name", ""), False)
