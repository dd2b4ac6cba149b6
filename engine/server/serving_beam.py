"""Beam search over HTTP: ``use_beam_search: true`` with ``n`` beams on completions and chat (vLLM's
fields; ``length_penalty`` too). Each step sends every live beam to the engine as a one-token
request with the top ``2 * n`` logprobs, exactly as ``LLM.beam_search`` does (scored as
transformers' beam search, see ``pageant.engine.beam_search``); the best ``n`` hypotheses come back
as the choices. Not streamed.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pageant.engine import SamplingParams
from pageant.engine.beam_search import MAX_BEAM_WIDTH, BeamSearch, BeamSearchOutput, BeamSearchParams
from pageant.engine.sampling_params import RequestOutputKind
from pageant.engine.server import protocol as p
from pageant.engine.server.validation import APIError, check_prompt_ids, resolve_max_tokens


def beam_params(body, max_tokens: int) -> BeamSearchParams:
    """The request's beam search, or a 400 for what beam search cannot honour."""
    for name in ("stream", "logprobs", "best_of", "echo"):
        if getattr(body, name, None) not in (None, False):
            raise APIError(400, f"{name} is not supported with use_beam_search", param=name)
    if body.temperature not in (None, 0, 0.0):
        raise APIError(400, "use_beam_search is deterministic: temperature must be 0 or unset", param="temperature")
    if not 1 <= body.n <= MAX_BEAM_WIDTH:
        raise APIError(400, f"with use_beam_search, n (the beam width) must be in [1, {MAX_BEAM_WIDTH}]", param="n")
    try:
        return BeamSearchParams(beam_width=body.n, max_tokens=max_tokens, ignore_eos=body.ignore_eos,
                                length_penalty=float(body.length_penalty))
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def search(serving, request_id: str, ids: list[int], params: BeamSearchParams, priority: int,
                 engine_kwargs: dict, raw: Request) -> BeamSearchOutput | None:
    """One prompt's beam search through the async engine; None if the client went away."""
    try:
        beams = BeamSearch(ids, params, serving.eos_token_ids)
    except ValueError as exc:
        raise APIError(400, str(exc), param="n") from None
    step = 0
    while not beams.done:
        live = beams.live()
        sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=beams.beams_to_keep,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        handles = await serving._open_all(f"{request_id}-step{step}", [b.tokens for b in live], sp, priority,
                                          engine_kwargs)
        finals = await serving._collect(handles, raw)
        if finals is None:
            return None
        tops = []
        for _, out in finals:
            top = sorted(out.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)[: beams.beams_to_keep]
            tops.append({t: lp.logprob for t, lp in top})
        beams.advance(tops)
        step += 1
    result = beams.output()
    for seq in result.sequences:
        seq.text = await serving.tokenizer.adecode(seq.tokens[len(ids):], skip_special_tokens=True)
    return result


async def run(serving, body, raw: Request, prompts: list[list[int]], model: str, engine_kwargs: dict,
              kind: str) -> Response:
    """Beam search for each prompt (concurrently); a completions or chat body with ``n`` choices each."""
    for ids in prompts:
        check_prompt_ids(ids, serving.limits, param="prompt" if kind == "completion" else "messages")
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    max_tokens = min(resolve_max_tokens(requested, 16 if kind == "completion" else None, len(ids), serving.limits)
                     for ids in prompts)
    params = beam_params(body, serving._cap_max_tokens(max_tokens))
    request_id = p.random_id("cmpl" if kind == "completion" else "chatcmpl")
    results = await asyncio.gather(*(search(serving, f"{request_id}-{i}", ids, params, body.priority, engine_kwargs, raw)
                                      for i, ids in enumerate(prompts)))
    if any(r is None for r in results):
        return Response(status_code=499)
    choices, completion_tokens = [], 0
    for i, (ids, result) in enumerate(zip(prompts, results)):
        for rank, seq in enumerate(result.sequences[: body.n]):
            completion_tokens += len(seq.tokens) - len(ids)
            index = i * body.n + rank
            if kind == "completion":
                choices.append(p.CompletionChoice(index=index, text=seq.text, finish_reason=seq.finish_reason))
            else:
                choices.append(p.ChatChoice(index=index, message=p.ChatResponseMessage(content=seq.text),
                                            finish_reason=seq.finish_reason))
    num_prompt = sum(len(ids) for ids in prompts)
    usage = p.UsageInfo(prompt_tokens=num_prompt, completion_tokens=completion_tokens,
                        total_tokens=num_prompt + completion_tokens)
    cls = p.CompletionResponse if kind == "completion" else p.ChatCompletionResponse
    resp = cls(id=request_id, created=int(time.time()), model=model, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump())
