"""HTTP calls to one engine pod's API: list models, load and unload LoRA adapters.

The base URL is ``pod_url_template.format(ip=podIP)`` (``http://<podIP>:8000`` in a cluster); tests
point it at a fake engine on 127.0.0.x. A pod that does not answer is reported, never raised.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp


@dataclasses.dataclass(frozen=True)
class PodCallResult:
    ok: bool
    status: int  # 0: no answer
    detail: str = ""


def error_message(payload: Any) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message"}}``, ``{"message"}`` or
    ``{"detail"}``), else ""."""
    if not isinstance(payload, dict):
        return ""
    err = payload.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    for key in ("message", "detail"):
        if isinstance(payload.get(key), str):
            return payload[key]
    return ""


class PodClient:
    def __init__(self, url_template: str = "http://{ip}:8000", timeout_seconds: float = 5.0) -> None:
        self.url_template = url_template
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def base_url(self, pod_ip: str) -> str:
        return self.url_template.format(ip=pod_ip).rstrip("/")

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, pod_ip: str, path: str, body: Any = None) -> tuple[PodCallResult, Any]:
        if self._closed:
            return PodCallResult(False, 0, "client closed"), None
        try:
            async with self._get_session().request(method, self.base_url(pod_ip) + path, json=body) as resp:
                text = await resp.text()
                try:
                    payload = await resp.json(content_type=None) if text else None
                except ValueError:
                    payload = None
                return PodCallResult(200 <= resp.status < 300, resp.status, text[:300]), payload
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return PodCallResult(False, 0, f"{type(exc).__name__}: {exc}"), None

    async def adapters(self, pod_ip: str) -> tuple[PodCallResult, set[str] | None]:
        """Names of the LoRA adapters the pod serves (entries of /v1/models that have a parent)."""
        result, payload = await self._call("GET", pod_ip, "/v1/models")
        if not result.ok or not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            return dataclasses.replace(result, ok=False), None
        return result, {m["id"] for m in payload["data"] if isinstance(m, dict) and m.get("parent") and "id" in m}

    async def load_adapter(self, pod_ip: str, name: str, path: str) -> PodCallResult:
        """Load one adapter; on failure ``detail`` is the engine's own error message."""
        result, payload = await self._call("POST", pod_ip, "/v1/load_lora_adapter",
                                           {"lora_name": name, "lora_path": path})
        message = error_message(payload)
        return dataclasses.replace(result, detail=message) if not result.ok and message else result

    async def unload_adapter(self, pod_ip: str, name: str) -> PodCallResult:
        result, _ = await self._call("POST", pod_ip, "/v1/unload_lora_adapter", {"lora_name": name})
        return result
