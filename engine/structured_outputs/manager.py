"""Compiling constraints off the engine thread, and the per-step bitmask of constrained rows.

``StructuredOutputManager.submit(params)`` starts (or finds in its LRU cache) the compilation of
a constraint on a worker thread and returns a future; a request holds a ``GrammarState`` around
that future and waits in the scheduler's queue until it is done (other requests run meanwhile).
``validate(params, timeout)`` is the blocking check the server and ``LLM`` make before a request
enters the engine: a bad constraint, or one that does not compile within the time limit, is a
``ValueError`` (an HTTP 400), never a stalled engine.

Every sequence of a request gets its own matcher when it samples its first token; matchers only
advance on sampled tokens, so preemption (recompute) and chunked prefill leave them in step.
With a reasoning parser (``reasoning_parser`` "deepseek_r1" / "qwen3"), a sequence is free until
its output contains the end of its reasoning (``</think>``); the constraint applies after it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from pageant.engine.structured_outputs.backends import BACKENDS
from pageant.engine.structured_outputs.params import StructuredOutputsParams

BACKEND_NAMES = ("auto", "xgrammar", "guidance")
CACHE_SIZE = 256
REASONING_END = {"deepseek_r1": "</think>", "qwen3": "</think>"}


@dataclass(eq=False)
class GrammarState:
    """A request's compiled constraint (a future until compiled) and its sequences' matchers."""

    future: cf.Future
    matchers: dict[int, Any] = field(default_factory=dict)  # sequence index -> matcher
    reasoning_end: str | None = None  # the constraint starts once the output contains it

    def active(self, seq) -> bool:
        """Whether ``seq``'s next token is constrained (always, unless it is still reasoning)."""
        return self.reasoning_end is None or seq.index in self.matchers or self.reasoning_end in seq.text

    @property
    def ready(self) -> bool:
        return self.future.done()

    @property
    def error(self) -> str | None:
        if not self.future.done() or self.future.exception() is None:
            return None
        return str(self.future.exception())

    def matcher(self, index: int):
        if index not in self.matchers:
            backend, compiled, params = self.future.result()
            self.matchers[index] = backend.matcher(compiled, params)
        return self.matchers[index]


class StructuredOutputManager:
    """One per engine: the backends (created on first use), a compile thread and its cache."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int], backend: str = "auto",
                 disable_any_whitespace: bool = False, reasoning_parser: str | None = None):
        if backend not in BACKEND_NAMES:
            raise ValueError(f"structured outputs backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if reasoning_parser is not None and reasoning_parser not in REASONING_END:
            raise ValueError(f"reasoning parser must be one of {sorted(REASONING_END)}, got {reasoning_parser!r}")
        self.reasoning_end = REASONING_END.get(reasoning_parser) if reasoning_parser else None
        self.default_backend, self.disable_any_whitespace = backend, disable_any_whitespace
        self._args = (hf_tokenizer, vocab_size, sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._backends: dict[str, Any] = {}
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._cache: collections.OrderedDict[tuple, cf.Future] = collections.OrderedDict()
        self._lock = threading.Lock()  # the server validates from its threads while the engine submits

    def backend_name(self, params: StructuredOutputsParams) -> str:
        """``auto``: xgrammar, which covers every kind (llguidance is the choice for Lark grammars)."""
        return "xgrammar" if self.default_backend == "auto" else self.default_backend

    def _backend(self, name: str):
        if name not in self._backends:
            self._backends[name] = BACKENDS[name](*self._args)
        return self._backends[name]

    def submit(self, params: StructuredOutputsParams) -> cf.Future:
        """The (cached) compilation of ``params``: a future of ``(backend, compiled grammar, params)``."""
        if self.disable_any_whitespace and not params.disable_any_whitespace:
            params = StructuredOutputsParams(**{**params.__dict__, "disable_any_whitespace": True})
        name = self.backend_name(params)
        key = (name, *params.key)

        def compile_():
            backend = self._backend(name)
            return backend, backend.compile(params), params

        with self._lock:
            future = self._cache.get(key)
            if future is not None:  # (a failed compile stays cached: the same bad input fails the same way)
                self._cache.move_to_end(key)
                return future
            future = self._executor.submit(compile_)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def validate(self, params: StructuredOutputsParams, timeout: float = 10.0) -> None:
        """Compile now (or take the cache); ``ValueError`` with the backend's message, or after
        ``timeout`` seconds (the compilation goes on and is cached for a retry)."""
        try:
            self.submit(params).result(timeout=timeout)
        except cf.TimeoutError:
            raise ValueError(f"the {params.kind} constraint did not compile within {timeout:g} s") from None

    def state(self, params: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self.submit(params), reasoning_end=self.reasoning_end)

    # ------------------------------------------------------------------ one step
    def bitmask(self, seqs: list) -> torch.Tensor | None:
        """int32 ``[num_rows, ceil(vocab / 32)]`` allowed-token bits for this step's sample rows
        (all bits set on unconstrained rows), or None when no row is constrained."""
        rows = [(i, s) for i, s in enumerate(seqs) if s.request.grammar is not None and s.request.grammar.active(s)]
        if not rows:
            return None
        mask = torch.full((len(seqs), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for i, seq in rows:
            seq.request.grammar.matcher(seq.index).fill(mask, i)
        return mask

    def bitmask_proposals(self, seqs: list, drafts: list[list[int]]) -> torch.Tensor | None:
        """Speculative decoding: the mask of every verified position, rows laid out as the verifier's
        (per sequence its current state, then the state after each of its first 1..k proposals).
        Each matcher walks its proposals and is rolled back; a row after a proposal the grammar
        refuses (or after the grammar ends) is never reached (that proposal cannot be accepted)."""
        if not any(s.request.grammar is not None and s.request.grammar.active(s) for s in seqs):
            return None
        mask = torch.full((sum(1 + len(d) for d in drafts), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        row = 0
        for seq, draft in zip(seqs, drafts):
            grammar = seq.request.grammar
            if grammar is not None and grammar.active(seq):
                matcher = grammar.matcher(seq.index)
                matcher.fill(mask, row)
                walked = 0
                for j, token in enumerate(draft):
                    allowed = (int(mask[row + j, token // 32]) >> (token % 32)) & 1  # by the mask just filled
                    # (a refused token is never offered: llguidance's matcher would not roll back from it)
                    if matcher.terminated or not allowed or not matcher.accept(token):
                        break
                    walked += 1
                    if not matcher.terminated:
                        matcher.fill(mask, row + j + 1)
                matcher.rollback(walked)
            row += 1 + len(draft)
        return mask

    def accept_run(self, seq, tokens: list[int]) -> int | None:
        """Advance ``seq``'s matcher over an accepted run; the index of the token that completed the
        constraint (the run ends there), else None."""
        grammar = seq.request.grammar
        if grammar is None or not grammar.active(seq):
            return None
        matcher = grammar.matcher(seq.index)
        for i, token in enumerate(tokens):
            if not matcher.accept(token):
                raise RuntimeError(f"token {token} was sampled outside the structured-output mask")
            if matcher.terminated:
                return i
        return None

    def accept(self, seqs: list, tokens: list[int]) -> list:
        """Advance each constrained sequence's matcher; the sequences whose constraint is complete."""
        done = []
        for seq, token in zip(seqs, tokens):
            grammar = seq.request.grammar
            if grammar is None or not grammar.active(seq):
                continue
            matcher = grammar.matcher(seq.index)
            if not matcher.accept(token):
                raise RuntimeError(f"token {token} was sampled outside the structured-output mask")
            if matcher.terminated:
                done.append(seq)
        return done

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """``logits`` [rows, vocab] float: disallowed tokens to -inf, in place (``bitmask`` from above)."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = bitmask.to(logits.device)  # [rows, words]
    allowed = ((words[:, :, None] >> bits) & 1).bool().reshape(words.shape[0], -1)[:, :vocab]  # [rows, vocab]
    logits.masked_fill_(~allowed, float("-inf"))
