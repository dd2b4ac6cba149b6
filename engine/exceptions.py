"""Errors the engine raises to its callers."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request (or its sampling parameters) that can never be served; the message is fit for an
    HTTP 400 body. Raised before the request enters the engine, so nothing is half-accepted."""


class EngineStepError(RuntimeError):
    """The model forward or sampling failed during ``LLMEngine.step()``.

    ``request_ids`` are the requests that were in the failed batch; the engine has already freed
    them (their KV blocks are back in the pool), so the caller fails exactly those and carries on.
    """

    def __init__(self, request_ids: list[str], cause: BaseException):
        self.request_ids = list(request_ids)
        self.cause = cause
        super().__init__(f"engine step failed for {len(self.request_ids)} request(s): {cause!r}")
