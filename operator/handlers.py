"""Every kopf handler of the operator, in one place. Each only delegates to operations.py."""

from __future__ import annotations

from typing import Any

import kopf

from pageant.operator import operations, schema
from pageant.operator.config import OperatorConfig
from pageant.operator.metrics import OperatorMetrics
from pageant.operator.reconcile import Runtime

RESOURCE = (schema.GROUP, schema.VERSION, schema.PLURAL)


def make_registry(config: OperatorConfig, rt: Runtime, metrics: OperatorMetrics) -> kopf.OperatorRegistry:
    """A fresh registry bound to this operator's config (so tests can run several)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(id="startup", registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        operations.configure(settings, config)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        return operations.login(config, rt, **kwargs)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await operations.cleanup(rt)

    @kopf.on.resume(*RESOURCE, id="resume", registry=registry)
    async def resume(body: kopf.Body, patch: kopf.Patch, memo: Any, retry: int, **_: Any) -> None:
        await operations.on_change("resume", body, patch, memo, retry, rt, metrics)

    @kopf.on.create(*RESOURCE, id="create", registry=registry)
    async def create(body: kopf.Body, patch: kopf.Patch, memo: Any, retry: int, **_: Any) -> None:
        await operations.on_change("create", body, patch, memo, retry, rt, metrics)

    @kopf.on.update(*RESOURCE, field="spec", id="update", registry=registry)
    async def update(body: kopf.Body, patch: kopf.Patch, memo: Any, retry: int, **_: Any) -> None:
        await operations.on_change("update", body, patch, memo, retry, rt, metrics)

    @kopf.timer(*RESOURCE, id="resync", interval=config.resync_seconds, initial_delay=config.resync_seconds,
                registry=registry)
    async def resync(body: kopf.Body, patch: kopf.Patch, memo: Any, logger: Any, **_: Any) -> None:
        await operations.on_resync(body, patch, memo, logger, rt, metrics)

    @kopf.on.delete(*RESOURCE, id="delete", optional=True, registry=registry)
    def delete(body: kopf.Body, **_: Any) -> None:
        operations.on_delete(body, metrics)

    return registry
