"""HTTP limits on request headers that uvicorn's h11 server does not apply by itself.

h11 bounds only an *incomplete* header block (``h11_max_incomplete_event_size``): a block that arrives
complete is parsed whatever its size or number of fields, and a connection that sends part of a
header and then nothing stays open for ever. So:

- ``HeaderLimitMiddleware`` (pure ASGI) answers 431 Request Header Fields Too Large, with an
  OpenAI-style JSON error body, when the header fields of a request total more than
  ``max_header_bytes`` (``name: value\\r\\n`` each; ``--h11-max-incomplete-event-size``, default
  16 KiB: the same limit h11 applies to an incomplete block) or number more than
  ``max_header_count`` (``--h11-max-header-count``, default 100), and 414 URI Too Long when the
  request target alone is longer than ``max_header_bytes``.
- ``LimitedH11Protocol`` (uvicorn's h11 protocol, which ``pageant serve`` selects explicitly with
  ``http=``) closes a connection whose request header is not complete ``header_timeout`` seconds
  after the connection opened or the header began (``--request-header-timeout``, default 10 s);
  one that had sent part of a header gets a 408 first. Between requests uvicorn's keep-alive
  timeout still applies. It also answers h11's "receive buffer too long" (an incomplete header
  block over the limit) with a JSON 431 instead of uvicorn's plain-text 400.
"""

from __future__ import annotations

import http
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pageant.engine.server.middleware import error_body, send_json

DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_HEADER_TIMEOUT = 10.0


def _too_large_body(message: str) -> dict:
    return error_body(message, "RequestHeaderFieldsTooLargeError", "request_header_fields_too_large")


class HeaderLimitMiddleware:
    """431 for too many or too large header fields, 414 for a too long request target."""

    def __init__(self, app, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_header_count: int = DEFAULT_MAX_HEADER_COUNT, on_reject=None):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.on_reject = on_reject or (lambda status: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or ()
        if len(headers) > self.max_header_count:
            return await self._reject(send, scope, 431, _too_large_body(
                f"The request has {len(headers)} header fields; at most {self.max_header_count} are allowed."))
        size = sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.max_header_bytes:
            return await self._reject(send, scope, 431, _too_large_body(
                f"The request's header fields total {size} bytes; at most {self.max_header_bytes} are allowed."))
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > self.max_header_bytes:
            return await self._reject(send, scope, 414, error_body(
                f"The request target is {target} bytes long; at most {self.max_header_bytes} are allowed.",
                "URITooLongError", "uri_too_long"))
        return await self.app(scope, receive, send)

    async def _reject(self, send, scope, status: int, body: dict) -> None:
        self.on_reject(status)
        if scope["type"] == "websocket":  # close the handshake (no HTTP response over ASGI websockets)
            return await send({"type": "websocket.close", "code": 1008})
        await send_json(send, status, body, {"connection": "close"})


def _raw_response(status: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + payload


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request header (see the module docstring)."""

    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer = None
        self._header_started = False  # part of a header has arrived (the timeout answers 408)
        self._protocol_error: h11.RemoteProtocolError | None = None
        self._discarding = False  # answered and closing: what still arrives is read and dropped
        next_event = self.conn.next_event

        def watched_next_event():  # remember why h11 refused, for send_400_response
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error = exc
                raise

        self.conn.next_event = watched_next_event

    @classmethod
    def with_timeout(cls, header_timeout: float | None) -> type["LimitedH11Protocol"]:
        """A subclass with this ``header_timeout`` (seconds; None or 0: no deadline)."""
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout or None})

    # ------------------------------------------------------------------ header deadline
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_header_timer()
        elif self.conn.their_state is h11.IDLE:  # still no complete request header
            self._header_started = self._header_started or bool(data)
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.header_timeout:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._header_started = False

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._header_started:
            self.logger.info("closing a connection whose request header was not complete after %ss",
                             self.header_timeout)
            self.transport.write(_raw_response(408, error_body(
                f"The request header was not complete within {self.header_timeout} seconds.",
                "RequestTimeoutError", "request_header_timeout")))
        self.transport.close()

    # ------------------------------------------------------------------ oversized incomplete header
    def send_400_response(self, msg: str) -> None:
        exc, self._protocol_error = self._protocol_error, None
        if exc is not None and getattr(exc, "error_status_hint", 400) == 431:
            self._cancel_header_timer()
            limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES
            self.transport.write(_raw_response(431, _too_large_body(
                f"The request header is larger than {limit} bytes.")))
            self._lingering_close()
            return
        super().send_400_response(msg)

    def _lingering_close(self, linger: float = 2.0) -> None:
        """Close after the reply, reading (and dropping) for up to ``linger`` seconds what the client is
        still sending: closing with unread data would reset the connection, and the client could lose
        the reply."""
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(linger, self.transport.close)
