"""The one module that talks to the Kubernetes API: the official ``kubernetes`` client, with kopf's
credentials (:mod:`pageant.operator.kube_config` turns a ``kopf.ConnectionInfo`` into its
``Configuration``).

Calls go through ``kubernetes.dynamic.DynamicClient.request`` on the resource paths built here
(:data:`RESOURCES`; no discovery walk at start-up), in a small thread pool so that kopf's event
loop never blocks. Writes carry ``fieldManager=pageant-operator``. They are create (POST) plus
JSON merge patch, not server-side apply: the reconciler's contract (409 on create adopts, create-
only children, the ownership check) is built on them, and the test API server (kmock) does not
implement apply (it 404s an apply of a missing object and keeps no managedFields).

404 on read/delete and 409 on create are normal outcomes, returned as values (None / False /
:class:`Conflict`), never raised as failures. Everything else becomes a typed :class:`ApiError`:
:class:`Forbidden` (403: RBAC, shown in status), :class:`ServerError` (5xx, or any other
status) and :class:`Unreachable` (connection refused, DNS, TLS, timeouts), which the reconciler
retries with backoff. The client itself never retries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import threading
import time
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from pageant.operator import kube_config

FIELD_MANAGER = "pageant-operator"

# kind -> (apiVersion, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "InferenceService": ("pageant.dev/v1alpha1", "inferenceservices", True),
    "Deployment": ("apps/v1", "deployments", True),
    "Service": ("v1", "services", True),
    "ConfigMap": ("v1", "configmaps", True),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims", True),
    "Pod": ("v1", "pods", True),
    "Job": ("batch/v1", "jobs", True),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets", True),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies", True),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "horizontalpodautoscalers", True),
    "ScaledObject": ("keda.sh/v1alpha1", "scaledobjects", True),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors", True),
    "PodMonitor": ("monitoring.coreos.com/v1", "podmonitors", True),
    "InterceptorRoute": ("http.keda.sh/v1beta1", "interceptorroutes", True),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools", True),
    "HTTPRoute": ("gateway.networking.k8s.io/v1", "httproutes", True),
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io/v1", "leaderworkersets", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
}


class ApiError(Exception):
    """A failed API call other than the normal 404/409."""

    def __init__(self, status: int, verb: str, kind: str, message: str):
        self.status, self.verb, self.kind = status, verb, kind
        super().__init__(f"{verb} {kind}: HTTP {status}: {message}")


class Forbidden(ApiError):
    """403: the operator's RBAC does not allow this call."""


class ServerError(ApiError):
    """5xx from the API server (or an unexpected status): retry later."""


class Unreachable(ApiError):
    """No answer at all: connection refused, DNS, timeout."""


class Conflict(Exception):
    """409 on create: the object already exists."""


def _path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural, namespaced = RESOURCES[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


def _matches(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class _NoDiscovery:
    """DynamicClient's discoverer slot: paths come from :data:`RESOURCES`, and optional APIs are
    probed by :meth:`KubeClient.api_available` with its own TTL."""

    def __init__(self, client: Any, cache_file: Any) -> None:
        pass


def _decode(data: Any) -> Any:
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    try:
        return json.loads(data) if data else None
    except ValueError:
        return data


class KubeClient:
    """Async facade over the official client. ``connection`` is a kopf.ConnectionInfo; it may be
    replaced (on re-login) with :meth:`set_connection`."""

    def __init__(self, timeout_seconds: float = 30.0, discovery_ttl_seconds: float = 60.0,
                 max_workers: int = 8) -> None:
        self._connection: Any = None
        # (client, temp files for its in-memory certificates); the lock because kopf may call
        # the (sync) login handler, hence set_connection, from another thread.
        self._client: tuple[DynamicClient, list[str]] | None = None
        self._lock = threading.Lock()
        self._timeout = timeout_seconds
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="pageant-kube")
        self._discovery: dict[str, tuple[float, set[str]]] = {}
        self._discovery_ttl = discovery_ttl_seconds
        self._closed = False

    def set_connection(self, connection: Any) -> None:
        with self._lock:
            if connection == self._connection:
                return
            self._connection, old, self._client = connection, self._client, None
        self._dispose(old)

    @staticmethod
    def _dispose(old: tuple[DynamicClient, list[str]] | None) -> None:
        """Close a replaced client (a call in flight on it fails as Unreachable and is retried)."""
        if old is not None:
            old[0].client.close()
            kube_config.remove_files(old[1])

    async def close(self) -> None:
        """Close for good: later calls fail as Unreachable instead of opening a new client."""
        with self._lock:
            self._closed, old, self._client = True, self._client, None
        self._dispose(old)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _get_client(self) -> DynamicClient:
        with self._lock:
            if self._connection is None or self._closed:
                raise Unreachable(0, "connect", "-", "client closed" if self._closed else "not logged in yet")
            if self._client is None:
                files: list[str] = []
                cfg, headers = kube_config.configuration(self._connection, files)
                api = k8s.ApiClient(cfg)
                api.user_agent = "pageant-operator"
                for header, value in headers.items():
                    api.set_default_header(header, value)
                self._client = (DynamicClient(api, discoverer=_NoDiscovery), files)
            return self._client[0]

    async def _request(self, method: str, kind: str, path: str, *, body: Any = None,
                       content_type: str = "application/json", params: dict[str, str] | None = None
                       ) -> tuple[int, Any]:
        """(HTTP status, decoded body) of one call; only "no answer" raises (Unreachable)."""
        client = self._get_client()
        call = functools.partial(client.request, method, path, body=body, content_type=content_type,
                                 serialize=False, _request_timeout=(self._timeout, self._timeout), **(params or {}))
        try:
            resp = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except ApiException as exc:
            if not exc.status:  # the client's own "no HTTP answer" (e.g. a TLS failure)
                raise Unreachable(0, method, kind, str(exc.reason)) from exc
            return exc.status, _decode(exc.body)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(0, method, kind, f"{type(exc).__name__}: {exc}") from exc
        return resp.status, _decode(resp.data)

    @staticmethod
    def _raise(status: int, verb: str, kind: str, payload: Any) -> None:
        message = payload.get("message", "") if isinstance(payload, dict) else str(payload)[:200]
        if status == 403:
            raise Forbidden(status, verb, kind, message)
        raise ServerError(status, verb, kind, message)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, payload = await self._request("GET", kind, _path(kind, namespace, name))
        if status == 404:
            return None
        if status != 200:
            self._raise(status, "get", kind, payload)
        return payload

    async def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace with all the labels (also filtered here, defensively)."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        status, payload = await self._request("GET", kind, _path(kind, namespace),
                                              params={"label_selector": selector})
        if status == 404:
            return []
        if status != 200:
            self._raise(status, "list", kind, payload)
        return [o for o in (payload or {}).get("items", []) if _matches(o, labels)]

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        status, payload = await self._request("POST", kind, _path(kind, meta.get("namespace")), body=obj,
                                              params={"field_manager": FIELD_MANAGER})
        if status == 409:
            raise Conflict(f"{kind} {meta.get('namespace')}/{meta['name']} already exists")
        if status not in (200, 201, 202):
            self._raise(status, "create", kind, payload)
        return payload

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7386: lists replaced whole, null deletes). None if not found."""
        status, payload = await self._request("PATCH", kind, _path(kind, namespace, name, subresource), body=patch,
                                              content_type="application/merge-patch+json",
                                              params={"field_manager": FIELD_MANAGER})
        if status == 404:
            return None
        if status != 200:
            self._raise(status, "patch", kind, payload)
        return payload

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        status, payload = await self._request("DELETE", kind, _path(kind, namespace, name),
                                              body={"propagationPolicy": "Background"})
        if status == 404:
            return False
        if status not in (200, 202):
            self._raise(status, "delete", kind, payload)
        return True

    async def api_available(self, kind: str) -> bool:
        """Whether the API server serves this kind (e.g. KEDA or Prometheus Operator CRDs installed)."""
        api_version, plural, _ = RESOURCES[kind]
        cached = self._discovery.get(api_version)
        if cached is None or time.monotonic() - cached[0] > self._discovery_ttl:
            path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
            status, payload = await self._request("GET", kind, path)
            if status == 404:
                names: set[str] = set()
            elif status == 200:
                names = {r.get("name", "") for r in (payload or {}).get("resources", [])}
            else:
                self._raise(status, "discover", kind, payload)
            cached = self._discovery[api_version] = (time.monotonic(), names)
        return plural in cached[1]
