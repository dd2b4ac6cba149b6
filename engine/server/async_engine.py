"""The bridge between asyncio handlers and the single-threaded ``LLMEngine``.

A dedicated thread owns the engine: it takes requests and aborts from a thread-safe queue, runs
``engine.step()`` while there is work, and hands a step's ``RequestOutput``s back to the event loop
in one ``loop.call_soon_threadsafe`` call, each into its request's ``_Stream`` (where an unread
cumulative output is replaced by the newer one). The event loop never runs model code, so
``/health`` and ``/metrics`` stay fast while the model computes. The outputs cross threads as the
engine made them: ``OutputProcessor.make_output`` builds new lists every step (the prompt's token
ids, which the engine never changes, are shared), so no later step mutates what a reader holds.

Requests whose sampling params ask for ``output_kind`` FINAL_ONLY (the non-streaming handlers) get
one output, when they finish; their token timings (TTFT, ITL) are read on the engine thread from the
engine's own request after every step, so the metrics are those of a streamed request.

Invariants: only the engine thread touches the engine after ``start()``; every admitted request
ends with exactly one terminal item in its stream (a finished output or an exception); a request
whose consumer goes away is aborted before the engine's next step, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import queue
import threading
import time
from typing import Any

from pageant.engine import EngineStepError, InvalidRequestError, SamplingParams
from pageant.engine.outputs import EmbeddingRequestOutput
from pageant.engine.sampling_params import RequestOutputKind
from pageant.engine.server.metrics import ServerMetrics

from pageant.engine.server.async_types import (AdapterGoneError, EngineDeadError, QueueFullError,  # noqa: F401
                                               RequestFailedError, RequestHandle, _Abort, _Add, _Call, _Stream,
                                               deliver_threadsafe)

logger = logging.getLogger("pageant.server")
_gc_collected = False  # freeze_gc_heap() collected once in this process


def freeze_gc_heap() -> None:
    """Move everything alive now (the imports, the loaded model, the engine) out of the garbage
    collector's generations (as vLLM's ``freeze_gc_heap`` after its warm-up): a full collection then
    scans only what the server allocated since, instead of a pause of a tenth of a second or more
    over the whole heap that holds the GIL, and with it the engine thread. The first call in a
    process collects first; ``gc.unfreeze()`` (``AsyncEngine.stop``) makes the heap collectable again."""
    global _gc_collected
    if not _gc_collected:
        _gc_collected = True
        gc.collect()
    gc.freeze()


class Admission:
    """Places held for requests that passed ``AsyncEngine.reserve`` and are not open yet (they are
    being tokenized). ``AsyncEngine.open`` takes one per request; ``release()`` frees the rest."""

    def __init__(self, engine: "AsyncEngine", keys: list[int]):
        self.engine = engine
        self.keys = keys

    def take(self) -> int | None:
        return self.keys.pop(0) if self.keys else None

    def release(self) -> None:
        for key in self.keys:
            self.engine._slots.pop(key, None)
        self.keys = []


class AsyncEngine:
    """Runs an ``LLMEngine`` on its own thread and serves requests to asyncio code.

    ``max_queued_requests``: how many requests may wait for the engine beyond those it can run at
    once; ``reserve`` (and ``check_capacity``) raise ``QueueFullError`` past it. Unfinished requests
    (admitted, or reserved while their prompts are tokenized) fill the engine's ``max_num_seqs``
    sequence slots in arrival order (a request takes ``best_of`` or ``n`` of them); the ones that do not
    fit are the queued ones. So a burst on an idle engine is admitted up to its free slots plus
    ``max_queued_requests`` (requests the scheduler holds back for other reasons, such as KV-cache room
    or the prefill token budget of one step, are not counted as queued). ``max_num_seqs``: the slots
    (default: the engine config's). ``stall_timeout``: how long the loop may go without a heartbeat
    (one per iteration, at least every ``idle_wait`` seconds when idle) before it is reported unhealthy.
    """

    def __init__(self, engine, metrics: ServerMetrics | None = None, *, max_queued_requests: int | None = None,
                 stall_timeout: float = 120.0, idle_wait: float = 0.5, max_num_seqs: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        if max_num_seqs is None:
            max_num_seqs = getattr(getattr(engine, "config", None), "max_num_seqs", 0)
        self.max_num_seqs = int(max_num_seqs or 0)
        self._slots: dict[int, int] = {}  # event loop side: unfinished request -> its sequences, in arrival order
        self._slot_ids = itertools.count()
        self.stall_timeout = stall_timeout
        self.idle_wait = idle_wait
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._final_only: dict[str, Any] = {}  # engine thread only: FINAL_ONLY request id -> the engine's request
        self._stats: dict = {}
        self._heartbeat = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead_reason: str | None = None  # the loop died (unexpected exception)
        self.step_error: str | None = None  # the last model-step failure (the process should be restarted)
        self.num_inflight = 0  # requests between add() and their end, event loop side
        self.draining = False
        self._gc_frozen = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stats = dict(self.engine.stats())
        self._heartbeat = time.monotonic()
        freeze_gc_heap()
        self._gc_frozen = True
        self._thread = threading.Thread(target=self._run, name="pageant-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._gc_frozen:  # what the server held at its start may be collected again (and at exit)
            self._gc_frozen = False
            gc.unfreeze()

    # ---------------------------------------------------------------- state
    @property
    def num_waiting(self) -> int:
        """Unfinished requests beyond the engine's sequence slots (see the class docstring)."""
        return self._num_queued()

    def _num_queued(self, extra: list[int] | tuple = ()) -> int:
        """Queued requests once ``extra`` requests (their sequence counts) arrive too."""
        used = queued = 0
        for seqs in [*self._slots.values(), *extra]:
            used += seqs
            if used > self.max_num_seqs:
                queued += 1
        return queued

    def stats(self) -> dict:
        return self._stats

    @property
    def fatal_error(self) -> str | None:
        """Why the engine can never step again (a tensor/pipeline-parallel rank is gone), else None:
        the server then exits non-zero so that its pod is restarted."""
        return getattr(self.engine, "fatal_error", None)

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): the loop thread is alive, beating, and no model step has failed."""
        if self.fatal_error is not None:
            return False, f"engine failed: {self.fatal_error}"
        if self.dead_reason is not None:
            return False, f"engine loop died: {self.dead_reason}"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        if self.step_error is not None:
            return False, f"a model step failed: {self.step_error}"
        age = time.monotonic() - self._heartbeat
        if age > self.stall_timeout:
            return False, f"engine loop made no progress for {age:.0f}s"
        return True, "ok"

    # ---------------------------------------------------------------- event loop side
    def check_capacity(self, num_requests: int = 1, seqs_per_request: int = 1) -> None:
        """Raise before any work (tokenizing included) if the requests cannot be admitted now."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self.max_queued_requests is None:
            return
        queued = self._num_queued([max(1, seqs_per_request)] * num_requests)
        if queued > self.max_queued_requests:
            waiting = self._num_queued()
            raise QueueFullError(f"{waiting} requests are waiting beyond the {self.max_num_seqs} sequences the engine "
                                 f"runs at once (limit {self.max_queued_requests})")

    def reserve(self, num_requests: int = 1, seqs_per_request: int = 1) -> Admission:
        """``check_capacity``, then hold the requests' places until they are opened (pass the result to
        ``open``) or released: concurrent requests being tokenized count against the limit too."""
        self.check_capacity(num_requests, seqs_per_request)
        keys = []
        for _ in range(num_requests):
            key = next(self._slot_ids)
            self._slots[key] = max(1, seqs_per_request)
            keys.append(key)
        return Admission(self, keys)

    async def add(self, request_id: str, prompt: Any, params: SamplingParams, *, priority: int = 0,
                  **engine_kwargs) -> _Stream:
        """Admit a request; raises ``InvalidRequestError`` (the engine refused it) or ``EngineDeadError``."""
        if self.dead_reason is not None or self._thread is None or self._stop.is_set() or self.fatal_error:
            raise EngineDeadError(self.dead_reason or self.fatal_error or "engine loop is not running")
        # DELTA outputs each hold only their step's news: none may replace an unread one
        stream = _Stream(asyncio.get_running_loop(),
                         coalesce=getattr(params, "output_kind", None) is not RequestOutputKind.DELTA)
        cmd = _Add(request_id, prompt, params, priority, time.time(), stream, engine_kwargs)
        self._commands.put(cmd)
        try:
            await asyncio.wrap_future(cmd.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been admitted meanwhile: the abort follows it in the queue
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort([request_id]))

    async def call(self, fn) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        if self.dead_reason is not None or self._stop.is_set() or self._thread is None:
            raise EngineDeadError(self.dead_reason or "engine loop is not running")
        cmd = _Call(fn)
        self._commands.put(cmd)
        return await asyncio.wrap_future(cmd.result)

    async def open(self, request_id: str, prompt: Any, params: SamplingParams, *, priority: int = 0,
                   admission: Admission | None = None, **engine_kwargs) -> "RequestHandle":
        """Admit a request and return its handle; raises ``InvalidRequestError`` or ``EngineDeadError``.
        It takes one place of ``admission`` (from ``reserve``), if given.

        The caller must ``close()`` the handle (in a ``finally``): closing an unfinished request aborts it.
        """
        slot = admission.take() if admission is not None else None
        if slot is None:
            slot = next(self._slot_ids)
            self._slots[slot] = max(1, getattr(params, "num_samples", 1))
        self.num_inflight += 1
        try:
            stream = await self.add(request_id, prompt, params, priority=priority, **engine_kwargs)
        except BaseException:
            self.num_inflight -= 1
            self._slots.pop(slot, None)
            raise
        return RequestHandle(self, request_id, stream, slot)

    def fail_all(self, message: str, status: int = 503) -> None:
        """Ask the engine thread to end every request with an error (used when draining times out)."""
        self._commands.put(("fail_all", message, status))

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        import torch

        # inference mode is per thread: the engine's tensors are made and updated under it
        with torch.inference_mode():
            self._loop()
        self._fail_pending(EngineDeadError(self.dead_reason or "the engine loop stopped"))

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block=idle):
                    break
                self._heartbeat = time.monotonic()
                if not self.engine.has_unfinished_requests():
                    self._stats = dict(self.engine.stats())
                    continue
                self._step()
                self._heartbeat = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not vanish
            logger.exception("engine loop died")
            self.dead_reason = repr(exc)
            for stream in self._streams.values():
                stream.put_threadsafe(RequestFailedError(f"engine loop died: {exc!r}"))
            self._streams.clear()
            self._final_only.clear()
            self._fail_pending(EngineDeadError(self.dead_reason))

    def _fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                cmd.accepted.set_exception(exc)
            elif isinstance(cmd, _Call):
                cmd.result.set_exception(exc)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; when idle wait up to ``idle_wait`` for one. False means stop."""
        try:
            cmd = self._commands.get(timeout=self.idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is None:
                return False
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd) -> None:
        if isinstance(cmd, _Add):
            if not cmd.accepted.set_running_or_notify_cancel():
                return  # the caller went away before the request was admitted
            lora = cmd.engine_kwargs.get("lora_request")
            if lora is not None and lora.lora_name not in {r.lora_name for r in self.engine.list_loras()}:
                # unloaded between routing and admission: the engine would load it again behind the
                # server's back (an offline convenience), so refuse instead
                cmd.accepted.set_exception(AdapterGoneError(f"The model `{lora.lora_name}` does not exist."))
                return
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival_time,
                                        priority=cmd.priority, **cmd.engine_kwargs)
            except Exception as exc:  # InvalidRequestError, or anything else: the request never entered
                cmd.accepted.set_exception(exc if isinstance(exc, InvalidRequestError) else InvalidRequestError(str(exc)))
                return
            self._streams[cmd.request_id] = cmd.stream
            if getattr(cmd.params, "output_kind", None) is RequestOutputKind.FINAL_ONLY and self.metrics is not None:
                request = getattr(self.engine, "requests", {}).get(cmd.request_id)
                if request is not None:
                    self._final_only[cmd.request_id] = request
            cmd.accepted.set_result(None)
        elif isinstance(cmd, _Abort):
            live = [rid for rid in cmd.request_ids if rid in self._streams]
            if live:
                self.engine.abort_request(live)
            for rid in live:
                self._streams.pop(rid, None)
                self._final_only.pop(rid, None)
                if self.metrics is not None:
                    self.metrics.forget(rid)
            self._stats = dict(self.engine.stats())
        elif isinstance(cmd, _Call):
            try:
                cmd.result.set_result(cmd.fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                cmd.result.set_exception(exc)
        elif isinstance(cmd, tuple) and cmd[0] == "fail_all":
            _, message, status = cmd
            ids = list(self._streams)
            if ids:
                self.engine.abort_request(ids)
            self._stats = dict(self.engine.stats())
            for rid in ids:
                self._final_only.pop(rid, None)
                if self.metrics is not None:
                    self.metrics.forget(rid)
                    self.metrics.failure("shutdown")
                self._streams.pop(rid).put_threadsafe(RequestFailedError(message, status=status))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            logger.error("model step failed for %d request(s): %r", len(exc.request_ids), exc.cause)
            self.step_error = repr(exc.cause)
            self._stats = dict(self.engine.stats())
            failed = []
            for rid in exc.request_ids:
                self._final_only.pop(rid, None)
                if self.metrics is not None:
                    self.metrics.forget(rid)
                    self.metrics.failure("engine_error")
                if rid in self._streams:
                    failed.append(self._streams.pop(rid))
            for stream in failed:  # last: whoever sees the error also sees the metrics and stats
                stream.put_threadsafe(RequestFailedError(f"the model step failed: {exc.cause!r}"))
            return
        now = time.time()
        self._stats = dict(self.engine.stats())  # before delivering: a client that sees its reply sees these
        metrics, streams = self.metrics, self._streams
        if metrics is not None and self._final_only:  # their outputs come only when they finish
            metrics.observe_requests(self._final_only.items(), now)
        deliveries = []
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if metrics is not None:
                if isinstance(out, EmbeddingRequestOutput):
                    metrics.observe_embedding(out, now)
                else:
                    metrics.observe_output(out, now)
            if out.finished:
                del streams[out.request_id]
                self._final_only.pop(out.request_id, None)
            deliveries.append((stream, out))
        if deliveries:
            deliver_threadsafe(deliveries)
