"""``POST /v1/embeddings`` bodies: OpenAI's ``CreateEmbeddingRequest`` / ``CreateEmbeddingResponse``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, StrictInt, StrictStr

from pageant.engine.server.protocol import _Request


class EmbeddingRequest(_Request):
    """``input``: a string, a list of strings, token ids, or lists of token ids. ``dimensions``:
    Matryoshka truncation (models that declare it only). ``encoding_format``: floats or base64 of
    little-endian float32, as OpenAI sends them."""

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    priority: StrictInt = 0


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
