"""The handlers' error policy, against a real client whose API server is unreachable."""

from __future__ import annotations

import asyncio
import socket

import kopf
import pytest

from pageant.operator import kube, operations
from pageant.operator.metrics import OperatorMetrics
from pageant.operator.podclient import PodClient
from pageant.operator.reconcile import Runtime


def _dead_server() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _runtime() -> Runtime:
    client = kube.KubeClient(timeout_seconds=2)
    client.set_connection(kopf.ConnectionInfo(server=_dead_server()))
    return Runtime(kube=client, pods=PodClient(), engine_image="img")


@pytest.mark.parametrize("retry,delay", [(0, 1.0), (3, 8.0), (10, 60.0)])
def test_unreachable_api_server_is_a_temporary_error_with_backoff(make_body, retry, delay):
    metrics = OperatorMetrics()

    async def run():
        rt = _runtime()
        try:
            await operations.on_change("create", make_body(), {}, {}, retry, rt, metrics)
        finally:
            await operations.cleanup(rt)

    with pytest.raises(kopf.TemporaryError) as info:
        asyncio.run(run())
    assert info.value.delay == delay
    assert metrics.registry.get_sample_value("pageant_operator_reconcile_errors_total",
                                             {"handler": "create", "reason": "unreachable"}) == 1


def test_resync_never_raises_and_leaves_status_alone(make_body):
    metrics = OperatorMetrics()
    patch: dict = {}

    async def run():
        rt = _runtime()
        try:
            await operations.on_resync(make_body(), patch, {}, rt.logger, rt, metrics)
        finally:
            await operations.cleanup(rt)

    asyncio.run(run())
    assert patch == {}
    assert metrics.registry.get_sample_value("pageant_operator_reconciliations_total",
                                             {"handler": "resync", "result": "retry"}) == 1


@pytest.mark.parametrize("exc,result,reason", [
    (kube.Forbidden(403, "get", "NetworkPolicy", "forbidden"), "retry", "forbidden"),
    (kube.Unreachable(0, "get", "Deployment", "connection refused"), "retry", "unreachable"),
    (kube.ServerError(500, "get", "Deployment", "boom"), "retry", "api_error"),
    (KeyError("a bug"), "error", "unexpected"),
])
def test_failures_are_counted_alike_by_every_handler(exc, result, reason):
    metrics = OperatorMetrics()
    for handler in ("create", "resync"):
        operations._count_failure(metrics, handler, exc)
        assert metrics.registry.get_sample_value("pageant_operator_reconciliations_total",
                                                 {"handler": handler, "result": result}) == 1
        assert metrics.registry.get_sample_value("pageant_operator_reconcile_errors_total",
                                                 {"handler": handler, "reason": reason}) == 1
