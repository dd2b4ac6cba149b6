"""The completions and chat-completions handlers: prompt → engine requests → OpenAI responses/streams.

Order of work for every request: model name, draining, cheap range checks, capacity (429 before
any tokenizing; the places are held while the prompt is tokenized), tokenization (on the tokenizer's
thread pool, off the event loop) and context-length checks, admission to the engine (which may still
refuse with a 400), then either a JSON body or server-sent events. A client that disconnects (while
queued, generating or streaming) has its requests aborted at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pageant.engine import InvalidRequestError, RequestOutput
from pageant.engine.sampling_params import RequestOutputKind
from pageant.engine.server import protocol as p
from pageant.engine.server import serving_beam, serving_chat, structured
from pageant.engine.server.async_engine import (AdapterGoneError, Admission, AsyncEngine, EngineDeadError,
                                                QueueFullError, RequestFailedError, RequestHandle)
from pageant.engine.server.formatting import completion_logprobs, text_logprobs_for_stream
from pageant.engine.server.tokens import ServerTokenizer
from pageant.engine.server.validation import (APIError, Limits, check_common, check_prompt_ids, resolve_max_tokens,
                                              sampling_params)

logger = logging.getLogger("pageant.server")


class ClientDisconnected(Exception):
    pass


async def _until_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _merged(handles: list[RequestHandle], disconnect: asyncio.Task) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position (an unread
    cumulative output is replaced by a newer one, see ``_Stream``). Raises a request's error, or
    ``ClientDisconnected`` when the client goes away; always closes (aborts) every handle.

    One future is awaited at a time: each stream marks itself ready when the engine thread delivers
    to it, and the disconnect task wakes the same future, so an output costs no task of its own."""
    loop = asyncio.get_running_loop()
    streams = [h.stream for h in handles]
    ready: dict[int, None] = {}  # streams with unread items, in the order they got them
    waiter: asyncio.Future | None = None

    def wake(*_) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def marker(i: int):
        def mark() -> None:
            ready[i] = None
            wake()
        return mark

    for i, stream in enumerate(streams):
        stream.listener = marker(i)
        if stream.items:
            ready[i] = None
    disconnect.add_done_callback(wake)
    remaining = sum(not s.finished for s in streams)
    try:
        while remaining:
            if not ready:
                if disconnect.done():
                    raise ClientDisconnected()
                waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    waiter = None
                continue
            i = next(iter(ready))
            del ready[i]
            stream = streams[i]
            for item in stream.read():
                if item.finished:
                    remaining -= 1
                yield i, item
    finally:
        disconnect.remove_done_callback(wake)
        for stream in streams:
            stream.listener = None
        for handle in handles:
            handle.close()


class _EventStream(StreamingResponse):
    """Server-sent events whose requests are closed (aborted if unfinished) however the response
    ends, even if the body iterator never started (e.g. the server could not send the headers)."""

    def __init__(self, body, handles: list[RequestHandle]):
        super().__init__(body, media_type="text/event-stream")
        self._handles = handles

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self._handles:
                handle.close()


def _sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


class OpenAIServing:
    """Serves ``/v1/completions`` and ``/v1/chat/completions`` for one engine."""

    def __init__(self, engine: AsyncEngine, tokenizer: ServerTokenizer, limits: Limits, *, model_names: list[str],
                 metrics=None, max_log_len: int | None = None, log_requests: bool = True, adapters=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_names = model_names
        self.metrics = metrics
        self.max_log_len = max_log_len
        self.log_requests = log_requests
        self.adapters = adapters
        self.draining = False
        self.runner = "generate"  # the engine's runner: "pooling" engines serve /v1/embeddings only
        self.eos_token_ids: frozenset[int] = frozenset()
        self.tool_call_parser: str | None = None  # --tool-call-parser
        self.enable_auto_tool_choice = False  # --enable-auto-tool-choice
        self.reasoning_parser: str | None = None  # --reasoning-parser
        # `pageant serve --generation-config`: sampling defaults for fields a request leaves unset, and
        # "max_tokens" as a cap on every request's (vLLM's semantics); empty: the built-in defaults
        self.default_sampling_params: dict = {}

    # ------------------------------------------------------------------ shared steps
    def resolve_model(self, name: str | None) -> tuple[str, dict]:
        """(the name to echo back, extra engine kwargs such as a LoRA request)."""
        if name is None or name in self.model_names:
            return name or self.model_names[0], {}
        if self.adapters is not None:
            lora = self.adapters.lora_request(name)
            if lora is not None:
                return name, {"lora_request": lora}
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def admit(self, num_requests: int, seqs_per_request: int = 1) -> Admission:
        """Places for the requests (release them once opened or refused), or a 429/503 before any work."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        try:
            return self.engine.reserve(num_requests, seqs_per_request)
        except QueueFullError as exc:
            raise APIError(429, f"Too many requests are waiting: {exc}. Retry later.", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineDeadError as exc:
            raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from None

    async def _open_all(self, request_id: str, prompts: list[list[int]], params, priority: int,
                        engine_kwargs: dict, admission: Admission | None = None) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for i, ids in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                prompt = ids if isinstance(ids, dict) else {"prompt_token_ids": ids}  # a dict: with images
                handles.append(await self.engine.open(rid, prompt, params, priority=priority,
                                                      admission=admission, **engine_kwargs))
        except AdapterGoneError as exc:
            for h in handles:
                h.close()
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        except InvalidRequestError as exc:
            for h in handles:
                h.close()
            raise APIError(400, str(exc)) from None
        except EngineDeadError as exc:
            for h in handles:
                h.close()
            raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from None
        except BaseException:
            for h in handles:
                h.close()
            raise
        return handles

    async def _constraint(self, body, constraint=None):
        """The request's structured-output constraint (or ``constraint``), compiled (a 400 if it
        cannot be), or None."""
        constraint = constraint or structured.constraint(body)
        if constraint is not None:
            if body.use_beam_search:
                raise APIError(400, "structured outputs are not supported with use_beam_search", param="use_beam_search")
            await structured.validate(self.engine.engine, constraint, body.guided_decoding_backend)
        return constraint

    def _with_defaults(self, body):
        """``body`` with the generation-config defaults filled in where it leaves a field unset."""
        unset = {k: v for k, v in self.default_sampling_params.items()
                 if k != "max_tokens" and getattr(body, k, 0) is None}
        return body.model_copy(update=unset) if unset else body

    def _cap_max_tokens(self, max_tokens: int) -> int:
        cap = self.default_sampling_params.get("max_tokens")
        return max_tokens if cap is None else min(max_tokens, cap)

    def _log(self, request_id: str, prompt: str | list, params, num_prompt_tokens: int, lora=None) -> None:
        if not self.log_requests:
            return
        if self.max_log_len is not None:
            prompt = prompt[: self.max_log_len]
        logger.info("request %s: prompt_tokens=%d lora=%s params=%s prompt=%r", request_id, num_prompt_tokens,
                    getattr(lora, "lora_name", None), params, prompt)

    def _failure_status(self, exc: RequestFailedError) -> APIError:
        return APIError(exc.status, str(exc), code="engine_error" if exc.status == 500 else "server_shutting_down")

    async def _collect(self, handles, raw: Request) -> list[tuple[int, RequestOutput]] | None:
        """(position, final output) of every request; None when the client went away first. A failed
        request raises its ``APIError``; the handles are closed however it ends."""
        disconnect = asyncio.create_task(_until_disconnect(raw))
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in _merged(handles, disconnect):
                if out.finished:
                    finals[i] = out
        except ClientDisconnected:
            return None
        except RequestFailedError as exc:
            raise self._failure_status(exc) from None
        finally:
            disconnect.cancel()
            for handle in handles:
                handle.close()
        return sorted(finals.items())

    async def _event_stream(self, handles, raw: Request, events) -> AsyncIterator[str]:
        """``events(disconnect)``'s server-sent events, then ``[DONE]``. A failed request ends the stream
        with its error event and ``[DONE]``; a client that went away ends it with nothing more. The
        requests' handles are closed however it ends."""
        disconnect = asyncio.create_task(_until_disconnect(raw))
        try:
            async for event in events(disconnect):
                yield event
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except RequestFailedError as exc:
            yield _sse(self._failure_status(exc).body())
            yield "data: [DONE]\n\n"
        finally:
            disconnect.cancel()
            for handle in handles:
                handle.close()

    # ------------------------------------------------------------------ completions
    async def completions(self, body: p.CompletionRequest, raw: Request) -> Response:
        model, engine_kwargs = self.resolve_model(body.model)
        body = self._with_defaults(body)
        check_common(body, self.limits)
        constraint = await self._constraint(body)
        if body.cache_salt is not None:
            engine_kwargs["cache_salt"] = body.cache_salt
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.stream and body.best_of is not None and body.best_of > body.n:
            raise APIError(400, "best_of > n is not supported with stream", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or any(len(x) == 0 for x in prompt):
            raise APIError(400, "the prompt must not be empty", param="prompt")
        if len(prompt) > self.limits.max_prompts:
            raise APIError(400, f"at most {self.limits.max_prompts} prompts per request", param="prompt")
        admission = self.admit(len(prompt), min(body.best_of or body.n, self.limits.max_n))
        if body.use_beam_search:
            try:
                prompts = [await self.tokenizer.aencode(x) if isinstance(x, str) else list(x) for x in prompt]
            finally:
                admission.release()
            return await serving_beam.run(self, body, raw, prompts, model, engine_kwargs, "completion")
        try:  # tokenizing runs off the event loop; the admission holds the requests' places meanwhile
            prompts = [await self.tokenizer.aencode(x) if isinstance(x, str) else list(x) for x in prompt]
            for ids in prompts:
                check_prompt_ids(ids, self.limits)
            max_tokens = self._cap_max_tokens(min(resolve_max_tokens(body.max_tokens, 16, len(ids), self.limits)
                                                  for ids in prompts))
            params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, limits=self.limits)
            params.structured_outputs = constraint
            if not body.stream:  # one output per request, when it finishes (not one per step)
                params.output_kind = RequestOutputKind.FINAL_ONLY
            request_id = p.random_id("cmpl")
            self._log(request_id, prompt[0], params, len(prompts[0]), engine_kwargs.get("lora_request"))
            handles = await self._open_all(request_id, prompts, params, body.priority, engine_kwargs, admission)
        finally:
            admission.release()
        try:
            echo = [await self.tokenizer.adecode(ids) if isinstance(x, list) else x
                    for x, ids in zip(prompt, prompts)] if body.echo else None
        except BaseException:
            for handle in handles:
                handle.close()
            raise
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = functools.partial(self._completion_events, handles, request_id, created, model, prompts, body,
                                       echo, include_usage)
            return _EventStream(self._event_stream(handles, raw, events), handles)
        finals = await self._collect(handles, raw)
        if finals is None:  # the client went away
            return Response(status_code=499)
        choices, completion_tokens = [], 0
        for i, out in finals:
            completion_tokens += sum(len(c.token_ids) for c in out.outputs)
            best = out.outputs
            if len(best) > body.n:  # best_of: the n most likely of the candidates
                best = sorted(best, key=lambda c: -(c.cumulative_logprob or 0.0))[: body.n]
            for rank, c in enumerate(best):
                text = (echo[i] if echo else "") + c.text
                lp = completion_logprobs(c, self.tokenizer, body.logprobs) if body.logprobs is not None else None
                choices.append(p.CompletionChoice(index=i * body.n + rank, text=text, logprobs=lp,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        num_prompt = sum(len(ids) for ids in prompts)
        usage = p.UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                            total_tokens=num_prompt + completion_tokens)
        resp = p.CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def _completion_events(self, handles, request_id, created, model, prompts, body, echo, include_usage,
                                 disconnect: asyncio.Task) -> AsyncIterator[str]:
        """The completion chunks as the choices grow (the usage chunk last when asked for)."""
        sent_text: dict[tuple[int, int], int] = {}
        sent_tokens: dict[tuple[int, int], int] = {}
        echoed: set[tuple[int, int]] = set()
        completion_tokens = 0
        async for i, out in _merged(handles, disconnect):
            choices = []
            for c in out.outputs:
                key = (i, c.index)
                start, tok_start = sent_text.get(key, 0), sent_tokens.get(key, 0)
                delta = c.text[start:]
                if echo and key not in echoed:  # the prompt leads the first chunk of each choice
                    echoed.add(key)
                    delta = echo[i] + delta
                new_tokens = len(c.token_ids) - tok_start
                finished = c.finish_reason is not None
                if not delta and not finished and not (body.logprobs is not None and new_tokens):
                    continue
                lp = None
                if body.logprobs is not None:
                    lp = text_logprobs_for_stream(c, self.tokenizer, body.logprobs, tok_start, start)
                sent_text[key] = len(c.text)
                sent_tokens[key] = len(c.token_ids)
                if finished:
                    completion_tokens += len(c.token_ids)
                choices.append(p.CompletionChoice(index=i * body.n + c.index, text=delta, logprobs=lp,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if choices:
                yield _sse(p.CompletionChunk(id=request_id, created=created, model=model, choices=choices))
        if include_usage:
            num_prompt = sum(len(ids) for ids in prompts)
            usage = p.UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                                total_tokens=num_prompt + completion_tokens)
            yield _sse(p.CompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage))

    # ------------------------------------------------------------------ chat
    async def chat(self, body: p.ChatCompletionRequest, raw: Request) -> Response:
        return await serving_chat.chat(self, body, raw)
