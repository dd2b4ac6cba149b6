"""Prometheus Operator ServiceMonitor / PodMonitor for the engine's /metrics."""

from __future__ import annotations

from typing import Any

from pageant.operator.builders import common
from pageant.operator.spec import InferenceServiceSpec


def monitor(spec: InferenceServiceSpec) -> dict[str, Any]:
    m = spec.monitoring
    if m is None:
        raise ValueError("monitor() needs spec.monitoring")
    endpoint = {"port": "http", "path": "/metrics", "interval": m.interval}
    key = "endpoints" if m.kind == "ServiceMonitor" else "podMetricsEndpoints"
    # A ServiceMonitor selects the engine's Service (by its labels), a PodMonitor the pods that
    # serve /metrics (with engine.nodes > 1 the leaders: headless workers have no `http` port).
    selector = common.selector_labels(spec) if m.kind == "ServiceMonitor" else common.serving_labels(spec)
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": m.kind,
        "metadata": common.metadata(spec, common.names(spec)["monitor"], "monitoring", labels=m.labels),
        "spec": {"selector": {"matchLabels": selector},
                 "namespaceSelector": {"matchNames": [spec.namespace]}, key: [endpoint]},
    }
