"""The ``/v1/embeddings`` handler: inputs → pooling requests (batched by the engine) → vectors.

Same order of work as generation (see ``serving.py``): model name, capacity (429 before any
tokenizing), tokenization off the event loop, length checks (an input over the context is a 400),
admission, then one JSON body. Needs an engine started with ``--runner pooling``.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pageant.engine.pooling import PoolingParams
from pageant.engine.server import protocol as p
from pageant.engine.server.protocol_embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from pageant.engine.server.validation import APIError


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """Floats as they are, or base64 of their little-endian float32 bytes (OpenAI's encoding)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def embeddings(serving, body: EmbeddingRequest, raw: Request) -> Response:
    """``serving`` is the server's ``OpenAIServing`` (model names, limits, tokenizer, engine)."""
    model, engine_kwargs = serving.resolve_model(body.model)
    if serving.runner != "pooling":
        raise APIError(400, "This model does not serve embeddings: start the server with --runner pooling.",
                       param="model", code="model_not_embedding")
    inputs = body.input
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs or any(len(x) == 0 for x in inputs):
        raise APIError(400, "the input must not be empty", param="input")
    if len(inputs) > serving.limits.max_prompts:
        raise APIError(400, f"at most {serving.limits.max_prompts} inputs per request", param="input")
    try:
        params = PoolingParams(dimensions=body.dimensions)
    except ValueError as exc:
        raise APIError(400, str(exc), param="dimensions") from None
    limit = serving.limits.max_model_len
    admission = serving.admit(len(inputs))
    try:
        ids = [await serving.tokenizer.aencode(x) if isinstance(x, str) else list(x) for x in inputs]
        for i, tokens in enumerate(ids):
            if len(tokens) > limit:
                raise APIError(400, f"input {i} has {len(tokens)} tokens; this model's context is {limit} tokens",
                               param="input", code="context_length_exceeded")
            bad = [t for t in tokens if not 0 <= t < serving.limits.vocab_size]
            if bad:
                raise APIError(400, f"input {i} has token ids outside the vocabulary: {bad[:5]}", param="input")
        request_id = p.random_id("embd")
        handles = await serving._open_all(request_id, ids, params, body.priority, engine_kwargs, admission)
    finally:
        admission.release()
    finals = await serving._collect(handles, raw)
    if finals is None:  # the client went away
        return Response(status_code=499)
    data = [EmbeddingData(index=i, embedding=encode(out.outputs.embedding, body.encoding_format)) for i, out in finals]
    num_tokens = sum(len(t) for t in ids)
    resp = EmbeddingResponse(id=request_id, created=int(time.time()), model=model, data=data,
                             usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
    return JSONResponse(resp.model_dump())
