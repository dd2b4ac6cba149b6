"""What crosses between the event loop and the engine thread (see ``async_engine.py``): the
server-side errors, the commands the engine thread applies, and a request's output stream with
the event loop's handle on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from pageant.engine import InvalidRequestError, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from pageant.engine.server.async_engine import AsyncEngine


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
    """One request's outputs, read by one coroutine (vLLM's ``RequestOutputCollector``).

    The engine thread hands a step's outputs to the event loop in one call (``deliver_threadsafe``);
    ``put`` runs on the loop. With ``coalesce`` (cumulative outputs) an unread output is replaced by a
    newer one: a reader that falls behind gets the newest state, not every step's. A finished output
    or an exception is terminal. ``listener`` (set by a reader of several streams) is called on every put.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, coalesce: bool = True):
        self.loop = loop
        self.coalesce = coalesce
        self.items: list[Any] = []  # delivered, not yet read: outputs (one, if coalesced) then any exception
        self.finished = False  # the reader took the terminal item
        self.waiter: asyncio.Future | None = None
        self.listener: Callable[[], None] | None = None

    def put(self, item: Any) -> None:
        """Event loop side: add an output or an exception, waking the reader."""
        items = self.items
        if (self.coalesce and items and not isinstance(item, BaseException)
                and not isinstance(items[-1], BaseException)):
            items[-1] = item  # cumulative: the newest output says all the older one did
        else:
            items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.listener is not None:
            self.listener()

    def take(self) -> list[Any]:
        """The unread items (oldest first), now read."""
        items, self.items = self.items, []
        return items

    def read(self) -> Iterator[Any]:
        """The unread outputs (``take``), the stream marked finished at its finished output or error
        (an error is raised, not yielded)."""
        for item in self.take():
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item

    async def wait(self) -> None:
        """Until there is an unread item."""
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def put_threadsafe(self, item: Any) -> None:
        """Any thread: ``put`` on the stream's loop."""
        try:
            self.loop.call_soon_threadsafe(self.put, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _put_all(pairs: list[tuple[_Stream, Any]]) -> None:
    for stream, item in pairs:
        stream.put(item)


def deliver_threadsafe(pairs: list[tuple[_Stream, Any]]) -> None:
    """Any thread: ``put`` each (stream, item) on its stream's loop, with one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
    for pair in pairs:
        by_loop.setdefault(pair[0].loop, []).append(pair)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class RequestHandle:
    """One admitted request: iterate ``outputs()``; ``close()`` aborts it if it has not finished."""

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: _Stream, slot: int | None = None):
        self.engine = engine
        self.request_id = request_id
        self.stream = stream
        self.slot = slot
        self.closed = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come (a newer cumulative output replaces an unread one), the
        finished one last; raises the request's error if it fails."""
        stream = self.stream
        while not stream.finished:
            await stream.wait()
            for item in stream.read():
                yield item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine.num_inflight -= 1
        self.engine._slots.pop(self.slot, None)
        if not self.stream.finished:
            self.stream.finished = True
            self.engine.abort(self.request_id)
            if self.engine.metrics is not None:
                self.engine.metrics.failure("abort")
