"""The operator's own Prometheus metrics (served on --metrics-port at /metrics)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    """One registry per operator instance (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciliations = Counter(
            "pageant_operator_reconciliations_total", "Reconciliations by handler and result "
            "(success, invalid, retry, error).", ["handler", "result"], registry=self.registry)
        self.errors = Counter(
            "pageant_operator_reconcile_errors_total", "Reconcile errors by handler and reason.",
            ["handler", "reason"], registry=self.registry)
        self.duration = Histogram(
            "pageant_operator_reconcile_duration_seconds", "Time spent in one reconciliation.", ["handler"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.managed = Gauge(
            "pageant_operator_managed_inferenceservices", "InferenceServices this operator manages.",
            registry=self.registry)
        self._managed: set[tuple[str, str]] = set()

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.duration.labels(handler).observe(time.perf_counter() - start)

    def track(self, namespace: str, name: str, present: bool) -> None:
        key = (namespace, name)
        if present:
            self._managed.add(key)
        else:
            self._managed.discard(key)
        self.managed.set(len(self._managed))
