"""Live LoRA adapters in every ready replica, with per-adapter failures and backoff.

Each pass reads every ready pod's ``/v1/models`` (so a replica that lost adapters, after a restart
or an OOM, is put right on the next resync), loads what is missing and unloads what the spec no
longer lists. A load that fails is recorded with the engine's own message and retried with
exponential backoff per (pod, adapter, path), not on every pass; a new path (a fixed spec) or a new
pod starts afresh. Only :mod:`pageant.operator.podclient` talks to pods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable

from pageant.operator import status
from pageant.operator.builders import workload
from pageant.operator.podclient import PodClient
from pageant.operator.spec import InferenceServiceSpec


@dataclasses.dataclass
class Failure:
    attempts: int
    retry_at: float
    message: str


@dataclasses.dataclass
class AdapterBackoff:
    """Failed loads and when each may be retried (one per operator process, shared by handlers)."""
    base_seconds: float = 5.0
    max_seconds: float = 300.0
    clock: Callable[[], float] = time.monotonic
    failures: dict[tuple[str, ...], Failure] = dataclasses.field(default_factory=dict)

    def due(self, key: tuple[str, ...]) -> bool:
        f = self.failures.get(key)
        return f is None or self.clock() >= f.retry_at

    def failed(self, key: tuple[str, ...], message: str) -> None:
        attempts = self.failures[key].attempts + 1 if key in self.failures else 1
        delay = min(self.base_seconds * 2 ** (attempts - 1), self.max_seconds)
        self.failures[key] = Failure(attempts, self.clock() + delay, message)

    def succeeded(self, key: tuple[str, ...]) -> None:
        self.failures.pop(key, None)

    def forget(self, namespace: str, name: str, keep: set[tuple[str, ...]]) -> None:
        """Drop entries of this service that no longer apply (pod gone, adapter removed or moved)."""
        for key in [k for k in self.failures if k[:2] == (namespace, name) and k not in keep]:
            del self.failures[key]


@dataclasses.dataclass
class AdapterSync:
    """What one pass saw: ready pods serving each adapter, per-pod errors, failed adapters' messages."""
    counts: dict[str, int]
    errors: list[str]
    failed: dict[str, str]


async def sync(pods_client: PodClient, backoff: AdapterBackoff, spec: InferenceServiceSpec,
               pods: list[dict[str, Any]]) -> AdapterSync:
    """Converge every ready pod on the spec's adapters (loads retried with backoff)."""
    desired = {e["name"]: e["path"] for e in workload.adapter_entries(spec)} if spec.lora_enabled else {}
    counts = {name: 0 for name in desired}
    errors: list[str] = []
    failed: dict[str, str] = {}
    keys: set[tuple[str, ...]] = set()

    async def one(pod: dict[str, Any]) -> None:
        ip, pod_name = (pod.get("status") or {}).get("podIP"), pod["metadata"]["name"]
        if not ip:
            return
        result, loaded = await pods_client.adapters(ip)
        if loaded is None:
            errors.append(f"pod {pod_name}: /v1/models: {result.status} {result.detail}".strip())
            return
        uid = (pod.get("metadata") or {}).get("uid") or ""
        for name in sorted(set(desired) - loaded):
            key = (spec.namespace, spec.name, pod_name, uid, name, desired[name])
            keys.add(key)
            if not backoff.due(key):
                message = backoff.failures[key].message
            else:
                r = await pods_client.load_adapter(ip, name, desired[name])
                if r.ok:
                    backoff.succeeded(key)
                    loaded.add(name)
                    continue
                message = f"HTTP {r.status} {r.detail}".strip()
                backoff.failed(key, message)
            failed.setdefault(name, f"pod {pod_name}: {message}")
            errors.append(f"pod {pod_name}: load {name}: {message}")
        for name in sorted(loaded - set(desired)):
            r = await pods_client.unload_adapter(ip, name)
            if r.ok:
                loaded.discard(name)
            else:
                errors.append(f"pod {pod_name}: unload {name}: HTTP {r.status} {r.detail}".strip())
        for name in desired:
            counts[name] += name in loaded

    await asyncio.gather(*(one(p) for p in pods if status.pod_ready(p)))
    backoff.forget(spec.namespace, spec.name, keys)
    return AdapterSync(counts, sorted(errors), failed)
