"""``/v1/chat/completions``: messages (and tools) → the chat template → engine → message or deltas.

The same order of work as completions (see ``serving.py``), plus: the tool plan (``chat_tools``)
decides the template's tools and any structured-output constraint; each choice's text passes
through ``ChoiceOutput`` (reasoning, then tool calls) whole or delta by delta.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pageant.engine.multimodal.chat import chat_prompt, image_urls
from pageant.engine.multimodal.media import MediaLimits
from pageant.engine.sampling_params import RequestOutputKind
from pageant.engine.server import protocol as p
from pageant.engine.server import serving_beam
from pageant.engine.server.chat_tools import ChoiceOutput, plan_tools
from pageant.engine.server.formatting import chat_logprobs
from pageant.engine.server.validation import APIError, check_common, check_prompt_ids, resolve_max_tokens, sampling_params


async def chat(serving, body: p.ChatCompletionRequest, raw: Request) -> Response:
    """``serving`` is the server's ``OpenAIServing``."""
    from pageant.engine.server.serving import _EventStream

    model, engine_kwargs = serving.resolve_model(body.model)
    body = serving._with_defaults(body)
    check_common(body, serving.limits)
    if body.cache_salt is not None:
        engine_kwargs["cache_salt"] = body.cache_salt
    if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
        raise APIError(400, "max_completion_tokens must be at least 1", param="max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    plan = plan_tools(body, serving.tool_call_parser, serving.enable_auto_tool_choice)
    constraint = await serving._constraint(body)
    if plan.constraint is not None:
        if constraint is not None:
            raise APIError(400, f"tool_choice {plan.choice!r} cannot be combined with another structured-output "
                                "constraint", param="tool_choice")
        constraint = plan.constraint
        await serving._constraint(body, constraint)
    admission = serving.admit(1, body.n)
    if body.use_beam_search and image_urls(body.messages):
        admission.release()
        raise APIError(400, "use_beam_search does not support image inputs", param="use_beam_search")
    if body.use_beam_search:
        try:
            ids = await serving.tokenizer.achat_ids(body.messages, body.add_generation_prompt, plan.tools)
        finally:
            admission.release()
        return await serving_beam.run(serving, body, raw, [ids], model, engine_kwargs, "chat")
    try:  # tokenizing runs off the event loop; the admission holds the request's place meanwhile
        prompt = ids = None
        if image_urls(body.messages):  # decoded, templated and processed here: bad images never reach the engine
            prompt, ids = await _image_prompt(serving, body, plan.tools)
        else:
            ids = await serving.tokenizer.achat_ids(body.messages, body.add_generation_prompt, plan.tools)
        check_prompt_ids(ids, serving.limits, param="messages")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = serving._cap_max_tokens(resolve_max_tokens(requested, None, len(ids), serving.limits))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, limits=serving.limits)
        params.structured_outputs = constraint
        if not body.stream:  # one output per request, when it finishes (not one per step)
            params.output_kind = RequestOutputKind.FINAL_ONLY
        request_id = p.random_id("chatcmpl")
        serving._log(request_id, ids, params, len(ids), engine_kwargs.get("lora_request"))
        handles = await serving._open_all(request_id, [prompt or ids], params, body.priority, engine_kwargs, admission)
    finally:
        admission.release()
    created = int(time.time())

    def outputs() -> ChoiceOutput:
        return ChoiceOutput(plan, serving.reasoning_parser)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = functools.partial(_chat_events, serving, handles, request_id, created, model, len(ids), body,
                                   include_usage, outputs)
        return _EventStream(serving._event_stream(handles, raw, events), handles)
    finals = await serving._collect(handles, raw)
    if finals is None:  # the client went away
        return Response(status_code=499)
    out = finals[0][1]
    choices, completion_tokens = [], 0
    for c in out.outputs:
        completion_tokens += len(c.token_ids)
        lp = chat_logprobs(c, serving.tokenizer, body.top_logprobs or 0, 0) if body.logprobs else None
        post = outputs()
        message = post.message(c.text)
        choices.append(p.ChatChoice(index=c.index, message=message, logprobs=lp,
                                    finish_reason=post.finish_reason(c.finish_reason), stop_reason=c.stop_reason))
    usage = p.UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                        total_tokens=len(ids) + completion_tokens)
    resp = p.ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump())


async def _chat_events(serving, handles, request_id, created, model, num_prompt, body, include_usage, outputs,
                       disconnect: asyncio.Task) -> AsyncIterator[str]:
    """The chat chunks: the assistant role first, then the choices' deltas (reasoning, content and
    tool calls), the usage chunk last when asked for."""
    from pageant.engine.server.serving import _merged, _sse

    def chunk(choices, usage=None) -> str:
        return _sse(p.ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    posts: dict[int, ChoiceOutput] = {}
    completion_tokens = 0
    yield chunk([p.ChatStreamChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))
                 for i in range(body.n)])
    async for _, out in _merged(handles, disconnect):
        choices = []
        for c in out.outputs:
            post = posts.setdefault(c.index, outputs())
            start, tok_start = sent_text.get(c.index, 0), sent_tokens.get(c.index, 0)
            new_text = c.text[start:]
            new_tokens = len(c.token_ids) - tok_start
            finished = c.finish_reason is not None
            delta = post.delta(new_text) if new_text else None
            sent_text[c.index] = len(c.text)  # fed to the parsers, whether or not they emit anything yet
            if finished:
                last = post.finish()
                if last is not None:
                    delta = _merge(delta, last)
            if delta is None and not finished and not (body.logprobs and new_tokens):
                continue
            lp = chat_logprobs(c, serving.tokenizer, body.top_logprobs or 0, tok_start) if body.logprobs else None
            sent_tokens[c.index] = len(c.token_ids)
            if finished:
                completion_tokens += len(c.token_ids)
            choices.append(p.ChatStreamChoice(index=c.index, delta=delta or p.DeltaMessage(), logprobs=lp,
                                              finish_reason=post.finish_reason(c.finish_reason),
                                              stop_reason=c.stop_reason))
        if choices:
            yield chunk(choices)
    if include_usage:
        usage = p.UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                            total_tokens=num_prompt + completion_tokens)
        yield chunk([], usage)


async def _image_prompt(serving, body: p.ChatCompletionRequest, tools) -> tuple[dict, list[int]]:
    """The engine prompt of a conversation with images (``pageant.engine.multimodal.chat``), or a 400."""
    processor = getattr(serving.engine.engine, "mm_processor", None)
    limits = getattr(serving, "media", None) or MediaLimits()
    try:
        return await serving.tokenizer.run(chat_prompt, serving.tokenizer, processor, body.messages,
                                           body.add_generation_prompt, tools, limits, p.TextContentPart)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


def _merge(a: p.DeltaMessage | None, b: p.DeltaMessage) -> p.DeltaMessage:
    if a is None:
        return b
    return p.DeltaMessage(content=((a.content or "") + (b.content or "")) or None,
                          reasoning_content=((a.reasoning_content or "") + (b.reasoning_content or "")) or None,
                          tool_calls=(a.tool_calls or []) + (b.tool_calls or []) or None)
