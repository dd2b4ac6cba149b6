"""What crosses between the event loop and the engine thread (see ``async_engine.py``): the
server-side errors, the commands the engine thread applies, and a request's output stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any

from pageant.engine import InvalidRequestError, SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queued_requests`` allows."""


class AdapterGoneError(InvalidRequestError):
    """The request names a LoRA adapter that was unloaded after the server routed it (answered 404)."""


class RequestFailedError(RuntimeError):
    """A request was ended by the server (engine step failure, shutdown) rather than by the model."""

    def __init__(self, message: str, *, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: SamplingParams
    priority: int
    arrival_time: float
    stream: "_Stream"
    engine_kwargs: dict
    accepted: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread (adapter loading and other engine calls)."""

    fn: Any
    result: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class _Stream:
    """Per-request queue of ``RequestOutput`` / ``BaseException`` items, read by one coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put_threadsafe(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass
