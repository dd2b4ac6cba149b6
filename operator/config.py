"""Operator settings, built once from the command line (or by tests) and never mutated."""

from __future__ import annotations

import dataclasses
from typing import Any

from pageant.operator.spec import DEFAULT_ENGINE_IMAGE


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """How the operator runs.

    resync_seconds: every InferenceService is re-reconciled this often (drift repair, status from
    the Deployment and pods, live adapter loading), on top of reacting to spec changes at once.
    pod_url_template: base URL of a pod's engine API; tests point it at a fake on 127.0.0.x.
    connection: a fixed kopf.ConnectionInfo (tests); None logs in in-cluster or via kubeconfig."""
    namespaces: tuple[str, ...] = ()
    metrics_port: int | None = 8080
    health_port: int | None = 8081
    engine_image: str = DEFAULT_ENGINE_IMAGE
    resync_seconds: float = 30.0
    pod_url_template: str = "http://{ip}:8000"
    pod_timeout_seconds: float = 5.0
    api_timeout_seconds: float = 30.0
    discovery_ttl_seconds: float = 60.0  # how soon newly installed CRDs (KEDA, Prometheus Operator) are seen
    adapter_retry_seconds: float = 5.0  # first retry of a failed adapter load (then doubling, up to 300 s)
    connection: Any = None
    verbose: bool = False
