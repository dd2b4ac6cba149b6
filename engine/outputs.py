"""What the engine returns: cumulative per-request state after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """The log-probability of one token, its rank in the distribution (1 = most likely) and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()`` floats) of a request's life; None until they happen."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request. ``text`` and ``token_ids`` are cumulative.

    ``text`` never ends in broken UTF-8, never contains a matched stop string (unless
    ``include_stop_str_in_output``) and holds back trailing characters that might start one.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: its prompt and its ``n`` completions so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))


@dataclass
class EmbeddingOutput:
    """The pooled vector of one input (``len`` = hidden size, or the requested ``dimensions``)."""

    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """The result of an embedding request (vLLM's ``EmbeddingRequestOutput`` shape)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))
