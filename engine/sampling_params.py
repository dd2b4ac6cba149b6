"""Sampling parameters of a request, validated at construction."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pageant.engine.exceptions import InvalidRequestError
from pageant.engine.structured_outputs.params import StructuredOutputsParams

MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class StopLimits:
    """Caps on a request's stop conditions. Stop strings are matched on the engine thread after every
    token, so their number and size bound that work (see detokenizer.py: each token's search covers
    only the new text plus the longest stop string). Defaults: 64 stop strings of 4096 characters in
    all, and 256 stop token ids; ``pageant serve`` sets them with ``--max-stop-strings``,
    ``--max-stop-chars`` and ``--max-stop-token-ids``."""

    max_stop_strings: int = 64
    max_stop_chars: int = 4096  # the total length of all stop strings of a request
    max_stop_token_ids: int = 256


DEFAULT_STOP_LIMITS = StopLimits()


class RequestOutputKind(enum.IntEnum):
    """Which ``RequestOutput``s a request produces and what they hold (vLLM's names and values)."""

    CUMULATIVE = 0  # after every step that changed it: everything generated so far (the default)
    DELTA = 1  # after every step that changed it: only what is new since its previous output
    FINAL_ONLY = 2  # one output, when it finishes (``LLM.generate``; non-streaming HTTP requests)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM's names and meanings).

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 is off. ``max_tokens=None`` means up to
    the context limit. ``logprobs``/``prompt_logprobs`` ask for that many top alternatives per token
    (at most 20) besides the chosen one. Any invalid value raises ``InvalidRequestError``.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # constrain the output to a JSON schema / regex / choice / grammar (pageant.engine.structured_outputs)
    structured_outputs: StructuredOutputsParams | None = None
    # the caps on stop/stop_token_ids checked here (None: DEFAULT_STOP_LIMITS)
    stop_limits: StopLimits | None = field(default=None, repr=False, compare=False)
    # normalised forms, filled by __post_init__
    stop_strs: tuple[str, ...] = field(init=False, repr=False, default=())
    stop_ids: frozenset[int] = field(init=False, repr=False, default=frozenset())
    max_stop_len: int = field(init=False, repr=False, default=0)  # the longest stop string

    def __post_init__(self) -> None:
        self._validate()
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strs = tuple(self.stop or ())
        self.max_stop_len = max(map(len, self.stop_strs), default=0)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.stop_ids = frozenset(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        if self.stop_limits is not None and not isinstance(self.stop_limits, StopLimits):
            raise bad("stop_limits must be a StopLimits")
        limits = self.stop_limits or DEFAULT_STOP_LIMITS

        if not _is_int(self.n) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.best_of is not None:
            if not _is_int(self.best_of) or self.best_of < self.n:
                raise bad(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise bad(f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise bad(f"{name} must be in [-2, 2], got {v!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
                raise bad("stop must be a string or a list of strings")
            if any(s == "" for s in stops):
                raise bad("stop strings must not be empty")
            if len(stops) > limits.max_stop_strings:
                raise bad(f"stop: at most {limits.max_stop_strings} stop strings are allowed, got {len(stops)}")
            total = sum(map(len, stops))
            if total > limits.max_stop_chars:
                raise bad(f"stop: the stop strings may have at most {limits.max_stop_chars} characters in all, "
                          f"got {total}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise bad("stop_token_ids must be a list of non-negative integers")
            if len(self.stop_token_ids) > limits.max_stop_token_ids:
                raise bad(f"stop_token_ids: at most {limits.max_stop_token_ids} stop token ids are allowed, "
                          f"got {len(self.stop_token_ids)}")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos must be a boolean")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias must be a mapping of token id to bias")
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise bad(f"logit_bias keys must be token ids, got {k!r}") from None
                if isinstance(k, bool) or tid < 0 or (isinstance(k, float) and k != tid):
                    raise bad(f"logit_bias keys must be token ids, got {k!r}")
                if not _is_number(v) or not -100 <= v <= 100:
                    raise bad(f"logit_bias values must be in [-100, 100], got {v!r} for token {k}")
        for name in ("skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be a boolean")
        if isinstance(self.output_kind, bool) or self.output_kind not in tuple(RequestOutputKind):
            raise bad(f"output_kind must be a RequestOutputKind (0, 1 or 2), got {self.output_kind!r}")
        self.output_kind = RequestOutputKind(self.output_kind)
        if self.output_kind is RequestOutputKind.DELTA and self.best_of is not None and self.best_of > self.n:
            raise bad("best_of > n needs output_kind CUMULATIVE or FINAL_ONLY: the best samples are only known "
                      "at the end, so they cannot be streamed as deltas")

    # ---------------------------------------------------------------- derived
    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_samples(self) -> int:
        """How many completions are generated (``best_of`` if set, else ``n``)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self, **changes) -> "SamplingParams":
        """A copy with some fields changed (validated again)."""
        fields = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if self.__dataclass_fields__[name].init
        }
        fields.update(changes)
        return SamplingParams(**fields)
