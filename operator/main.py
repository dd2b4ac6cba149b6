"""Process entry points: the blocking `pageant operator run`, and an awaitable for tests."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
from prometheus_client import start_http_server

from pageant.operator.adapters import AdapterBackoff
from pageant.operator.config import OperatorConfig
from pageant.operator.handlers import make_registry
from pageant.operator.kube import KubeClient
from pageant.operator.metrics import OperatorMetrics
from pageant.operator.podclient import PodClient
from pageant.operator.reconcile import Runtime


async def serve(config: OperatorConfig, metrics: OperatorMetrics | None = None,
                stop_flag: Any = None, ready_flag: Any = None) -> None:
    """Run the kopf operator until stop_flag is set (standalone: no peering)."""
    metrics = metrics or OperatorMetrics()
    rt = Runtime(kube=KubeClient(config.api_timeout_seconds, config.discovery_ttl_seconds),
                 pods=PodClient(config.pod_url_template, config.pod_timeout_seconds),
                 engine_image=config.engine_image,
                 adapter_backoff=AdapterBackoff(base_seconds=config.adapter_retry_seconds))
    registry = make_registry(config, rt, metrics)
    liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    try:
        await kopf.operator(registry=registry, standalone=True, clusterwide=not config.namespaces,
                            namespaces=list(config.namespaces), liveness_endpoint=liveness,
                            stop_flag=stop_flag, ready_flag=ready_flag)
    finally:
        await rt.kube.close()
        await rt.pods.close()


def run_operator(config: OperatorConfig) -> int:
    logging.basicConfig(level=logging.DEBUG if config.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = OperatorMetrics()
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.registry)
    asyncio.run(serve(config, metrics))
    return 0
