"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass through untouched):
API-key checks in constant time and request-body size limits, both answering OpenAI-style errors."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class GuardMiddleware:
    """Rejects unauthenticated requests (401) and bodies over ``max_body_bytes`` (413).

    ``api_keys``: accepted bearer tokens; empty means no authentication. ``/health``, ``/ready`` and
    ``/metrics`` are always open (probes and Prometheus). ``on_reject(status)`` counts rejections.
    """

    def __init__(self, app, *, api_keys: list[str], max_body_bytes: int, on_reject=None):
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject or (lambda status: None)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        token = token.strip()
        ok = False
        for key in self.api_keys:  # compare against every key: no early exit leaks which one matched
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_keys and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            self.on_reject(401)
            return await send_json(send, 401, error_body("Invalid or missing API key: send `Authorization: Bearer <key>`.",
                                                         "AuthenticationError", "invalid_api_key"),
                                   {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked upload): read the body here, up to the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        self.on_reject(413)
        await send_json(send, 413, error_body(f"The request body is larger than {self.max_body_bytes} bytes.",
                                              "RequestTooLargeError", "request_too_large"))
