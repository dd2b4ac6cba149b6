"""The reader :mod:`pageant.operator.spec` parses with, and the newer spec sections (pure; no I/O):
``spec.autoscaling.scaleFromZero`` (the KEDA HTTP add-on) and ``spec.routing.inferencePool``
(Gateway API Inference Extension). Same habits as spec.py: collect every problem, never raise here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pageant.operator import schema

DEFAULT_EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.2.1"


class _Reader:
    """Walks the raw dict, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(self, d: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str,
            default: Any = None, required: bool = False) -> Any:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            if required:
                self.problems.append(f"{path}.{key}: required")
            return default
        value = d[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and isinstance(value, int) and not isinstance(value, bool) and path.endswith(
                ("resources", "cache")):
            value = str(value)  # quantities may be plain integers
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"{path}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
            return default
        return value

    def minimum(self, value: Any, low: float, path: str, exclusive: bool = False) -> None:
        if value is not None and (value <= low if exclusive else value < low):
            self.problems.append(f"{path}: must be {'>' if exclusive else '>='} {low}")

    def enum(self, value: Any, allowed: list[str], path: str) -> None:
        if value is not None and value not in allowed:
            self.problems.append(f"{path}: must be one of {allowed}, got {value!r}")

    def pattern(self, value: Any, regex: str, path: str) -> None:
        if value is not None and not re.match(regex, value):
            self.problems.append(f"{path}: {value!r} does not match {regex}")


@dataclasses.dataclass(frozen=True)
class ScaleFromZeroSpec:
    """How a service idled to zero wakes up: the KEDA HTTP add-on's interceptor holds requests that
    arrive at zero while KEDA scales up. Unset timeouts follow engine.startupTimeoutSeconds."""
    enabled: bool = True
    interceptor_service: str = "keda-add-ons-http-interceptor-proxy"
    interceptor_namespace: str = "keda"
    interceptor_port: int = 8080
    scaler_address: str = "keda-add-ons-http-external-scaler.keda:9090"
    target_concurrency: int = 100
    readiness_timeout: str | None = None
    request_timeout: str | None = None
    response_header_timeout: str = "300s"


@dataclasses.dataclass(frozen=True)
class InferencePoolSpec:
    """spec.routing.inferencePool: an InferencePool, its endpoint picker and an HTTPRoute."""
    gateway_name: str
    gateway_namespace: str
    section_name: str | None = None
    epp_image: str = DEFAULT_EPP_IMAGE
    epp_replicas: int = 1
    failure_mode: str = "FailClose"


def scale_from_zero(r: _Reader, raw: dict[str, Any] | None) -> ScaleFromZeroSpec:
    """Parse spec.autoscaling.scaleFromZero (absent: every default)."""
    p = "spec.autoscaling.scaleFromZero"
    if raw is None:
        return ScaleFromZeroSpec()
    d = ScaleFromZeroSpec()
    port = r.get(raw, "interceptorPort", int, p, d.interceptor_port)
    r.minimum(port, 1, f"{p}.interceptorPort")
    target = r.get(raw, "targetConcurrency", int, p, d.target_concurrency)
    r.minimum(target, 1, f"{p}.targetConcurrency")
    timeouts = r.get(raw, "timeouts", dict, p, {})
    for key in ("readiness", "request", "responseHeader"):
        r.pattern(r.get(timeouts, key, str, f"{p}.timeouts"), schema.DURATION, f"{p}.timeouts.{key}")
    return ScaleFromZeroSpec(
        enabled=r.get(raw, "enabled", bool, p, True),
        interceptor_service=r.get(raw, "interceptorService", str, p, d.interceptor_service),
        interceptor_namespace=r.get(raw, "interceptorNamespace", str, p, d.interceptor_namespace),
        interceptor_port=port, scaler_address=r.get(raw, "scalerAddress", str, p, d.scaler_address),
        target_concurrency=target, readiness_timeout=timeouts.get("readiness"),
        request_timeout=timeouts.get("request"),
        response_header_timeout=timeouts.get("responseHeader") or d.response_header_timeout)


def inference_pool(r: _Reader, raw: dict[str, Any] | None, namespace: str) -> InferencePoolSpec | None:
    """Parse spec.routing.inferencePool; None unless enabled."""
    p = "spec.routing.inferencePool"
    if raw is None or not r.get(raw, "enabled", bool, p, False):
        return None
    gw = r.get(raw, "gateway", dict, p, {}, required=True)
    name = r.get(gw, "name", str, f"{p}.gateway", "", required=True)
    r.pattern(name or None, schema.DNS_SUBDOMAIN, f"{p}.gateway.name")
    failure = r.get(raw, "failureMode", str, p, "FailClose")
    r.enum(failure, ["FailClose", "FailOpen"], f"{p}.failureMode")
    replicas = r.get(raw, "eppReplicas", int, p, 1)
    r.minimum(replicas, 1, f"{p}.eppReplicas")
    return InferencePoolSpec(
        gateway_name=name or "", gateway_namespace=r.get(gw, "namespace", str, f"{p}.gateway", namespace),
        section_name=r.get(gw, "sectionName", str, f"{p}.gateway"),
        epp_image=r.get(raw, "eppImage", str, p, DEFAULT_EPP_IMAGE), epp_replicas=replicas,
        failure_mode=failure)
