"""Scale from zero that wakes up: the KEDA HTTP add-on's InterceptorRoute and the wake address.

Requests to ``<name>-wake`` (an ExternalName Service for the add-on's interceptor proxy) reach the
interceptor, which matches them on their Host header, counts them (the pending-request count that
KEDA's ``external-push`` trigger reads, see :func:`external_push_trigger`) and holds them until a
replica is ready, then forwards them to the engine Service. Its timeouts cover a cold start.
"""

from __future__ import annotations

import re
from typing import Any

from pageant.operator.builders import common
from pageant.operator.spec import InferenceServiceSpec
from pageant.operator.spec_ext import ScaleFromZeroSpec

API_VERSION = "http.keda.sh/v1beta1"
COLD_START_MARGIN_SECONDS = 120  # scheduling and image pull, on top of the model load
REQUEST_MARGIN_SECONDS = 600  # a long generation after the cold start


def _sfz(spec: InferenceServiceSpec) -> ScaleFromZeroSpec:
    if not spec.wakes_from_zero or spec.autoscaling is None:
        raise ValueError("needs autoscaling with provider keda, minReplicas 0 and scaleFromZero enabled")
    return spec.autoscaling.scale_from_zero


def seconds(duration: str) -> float:
    """A Go duration (``1h30m``, ``45s``, ``500ms``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ms|s|m|h)", duration))


def timeouts(spec: InferenceServiceSpec) -> dict[str, str]:
    """The interceptor's timeouts: readiness covers a cold start (engine.startupTimeoutSeconds plus a
    margin) unless set; the request budget covers the cold start plus a long generation."""
    sfz = _sfz(spec)
    readiness = sfz.readiness_timeout or f"{spec.engine.startup_timeout_seconds + COLD_START_MARGIN_SECONDS}s"
    request = sfz.request_timeout or f"{int(seconds(readiness)) + REQUEST_MARGIN_SECONDS}s"
    return {"readiness": readiness, "request": request, "responseHeader": sfz.response_header_timeout}


def wake_service_name(spec: InferenceServiceSpec) -> str:
    return common.names(spec)["wake"]


def hosts(spec: InferenceServiceSpec) -> list[str]:
    """Host headers that name this service at the interceptor (every in-cluster spelling of the wake
    Service, with and without the port)."""
    sfz, base = _sfz(spec), wake_service_name(spec)
    names = [base, f"{base}.{spec.namespace}", f"{base}.{spec.namespace}.svc",
             f"{base}.{spec.namespace}.svc.cluster.local"]
    return names + [f"{n}:{sfz.interceptor_port}" for n in names]


def url(spec: InferenceServiceSpec) -> str:
    """The OpenAI base URL that wakes the service (status.url when scale from zero is active)."""
    sfz = _sfz(spec)
    return f"http://{wake_service_name(spec)}.{spec.namespace}.svc.cluster.local:{sfz.interceptor_port}/v1"


def interceptor_route(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The add-on's InterceptorRoute: match the wake hosts, forward to the engine Service's `http`
    port, count in-flight requests (concurrency), hold them through a cold start."""
    sfz = _sfz(spec)
    return {
        "apiVersion": API_VERSION, "kind": "InterceptorRoute",
        "metadata": common.metadata(spec, common.names(spec)["interceptorroute"], "autoscaler"),
        "spec": {
            "target": {"service": common.names(spec)["service"], "port": common.HTTP_PORT},
            "rules": [{"hosts": hosts(spec)}],
            "scalingMetric": {"concurrency": {"targetValue": sfz.target_concurrency}},
            "timeouts": timeouts(spec),
        },
    }


def wake_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """ExternalName Service ``<name>-wake`` -> the interceptor proxy (in the add-on's namespace)."""
    sfz = _sfz(spec)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(spec, wake_service_name(spec), "autoscaler"),
        "spec": {"type": "ExternalName",
                 "externalName": f"{sfz.interceptor_service}.{sfz.interceptor_namespace}.svc.cluster.local",
                 "ports": [{"name": "http", "port": sfz.interceptor_port, "protocol": "TCP"}]},
    }


def external_push_trigger(spec: InferenceServiceSpec) -> dict[str, Any]:
    """KEDA trigger on the add-on's pending-request count for this route: it is what activates the
    ScaledObject (0 -> 1) when requests arrive at zero."""
    sfz = _sfz(spec)
    return {"type": "external-push", "metadata": {
        "scalerAddress": sfz.scaler_address, "interceptorRoute": common.names(spec)["interceptorroute"]}}
