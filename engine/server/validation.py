"""Request checks done before anything reaches the engine, and the OpenAI-style error type.

Every rejected request becomes an ``APIError`` carrying the HTTP status and the OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``); nothing here raises anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pageant.engine import InvalidRequestError, SamplingParams
from pageant.engine.sampling_params import DEFAULT_STOP_LIMITS, StopLimits
from pageant.engine.server.protocol import ChatCompletionRequest, CompletionRequest

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error reply: ``status`` plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_CACHE_SALT_CHARS = 1024


@dataclass(frozen=True)
class Limits:
    """Caps applied to every request (besides the engine's own checks)."""

    max_model_len: int
    vocab_size: int
    max_n: int = 16
    max_logprobs: int = 20
    max_prompts: int = 64
    stop: StopLimits = DEFAULT_STOP_LIMITS  # --max-stop-strings, --max-stop-chars, --max-stop-token-ids


def _check_finite(req, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(req, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"{name} must be a finite number, got {value}", param=name)
    bias = getattr(req, "logit_bias", None) or {}
    for key, value in bias.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"logit_bias[{key}] must be a finite number", param="logit_bias")


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise APIError(400, f"logit_bias token id {token_id} is out of the vocabulary (size {vocab_size})",
                           param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        out[token_id] = float(value)
    return out


def check_common(req: CompletionRequest | ChatCompletionRequest, limits: Limits) -> None:
    """Range checks that do not need the prompt's length."""
    _check_finite(req, ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                        "repetition_penalty"))
    if not 1 <= req.n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n}, got {req.n}", param="n")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    if req.max_tokens is not None and req.max_tokens > limits.max_model_len:
        raise APIError(400, f"max_tokens ({req.max_tokens}) exceeds the model's maximum context length "
                       f"({limits.max_model_len})", param="max_tokens", code="context_length_exceeded")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.cache_salt is not None and not req.cache_salt:
        raise APIError(400, "cache_salt must be a non-empty string if provided", param="cache_salt")
    if req.cache_salt is not None and len(req.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise APIError(400, f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters", param="cache_salt")
    _check_stop(req, limits.stop)
    for token_id in req.stop_token_ids or ():
        if not 0 <= token_id < limits.vocab_size:
            raise APIError(400, f"stop_token_ids: token id {token_id} is out of the vocabulary", param="stop_token_ids")


def _check_stop(req, limits: StopLimits) -> None:
    """The caps on stop conditions (matched on the engine thread after every token), before any work."""
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > limits.max_stop_strings:
        raise APIError(400, f"stop: at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)} "
                       "(the server's --max-stop-strings)", param="stop", code="too_many_stop_strings")
    total = sum(map(len, stops))
    if total > limits.max_stop_chars:
        raise APIError(400, f"stop: the stop strings may have at most {limits.max_stop_chars} characters in all, "
                       f"got {total} (the server's --max-stop-chars)", param="stop", code="stop_strings_too_long")
    count = len(req.stop_token_ids or ())
    if count > limits.max_stop_token_ids:
        raise APIError(400, f"stop_token_ids: at most {limits.max_stop_token_ids} stop token ids are allowed, got "
                       f"{count} (the server's --max-stop-token-ids)", param="stop_token_ids",
                       code="too_many_stop_token_ids")


def check_prompt_ids(ids: list[int], limits: Limits, param: str = "prompt") -> None:
    if not ids:
        raise APIError(400, "the prompt must not be empty", param=param)
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of the vocabulary (size {limits.vocab_size})", param=param)


def resolve_max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int, limits: Limits,
                       param: str = "max_tokens") -> int:
    """The number of tokens to generate; 400 if prompt + completion cannot fit the context."""
    room = limits.max_model_len - num_prompt_tokens
    max_tokens = requested if requested is not None else default
    if max_tokens is None:
        max_tokens = room
    if room < 1 or max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max(max_tokens, 1)} tokens ({num_prompt_tokens} in the prompt, {max(max_tokens, 1)} "
            "in the completion). Please reduce the length of the prompt or the completion.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(req: CompletionRequest | ChatCompletionRequest, *, max_tokens: int, logprobs: int | None,
                    limits: Limits, prompt_logprobs: int | None = None) -> SamplingParams:
    """Build the engine's ``SamplingParams``; its own checks become 400s naming the field."""
    if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
        param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise APIError(400, f"{param} must be between 0 and {limits.max_logprobs}, got {logprobs}", param=param)
    best_of = getattr(req, "best_of", None)
    if best_of is not None and not req.n <= best_of <= limits.max_n:
        raise APIError(400, f"best_of must be between n ({req.n}) and {limits.max_n}, got {best_of}", param="best_of")
    kwargs = dict(
        n=req.n,
        best_of=best_of,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else float(req.min_p),
        presence_penalty=0.0 if req.presence_penalty is None else float(req.presence_penalty),
        frequency_penalty=0.0 if req.frequency_penalty is None else float(req.frequency_penalty),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(req.logit_bias, limits.vocab_size),
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        stop_limits=limits.stop,
    )
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        message = str(exc)
        param = max((name for name in kwargs if message.startswith(name)), key=len, default=None)
        raise APIError(400, message, param=param) from None
