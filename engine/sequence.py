"""Requests and their sequences: the engine's mutable per-request state.

A ``Request`` holds the prompt and one ``Sequence`` per sample (``n``, or ``best_of``). It starts
with one sequence; when that sequence's prefill completes, the scheduler forks the others from it
so all samples share the prompt's KV blocks (copy-on-write for the last, partial block).
The scheduling unit is the ``Sequence``.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from pageant.engine.outputs import Logprob, RequestMetrics
from pageant.engine.pooling import PoolingState
from pageant.engine.structured_outputs.manager import GrammarState
from pageant.engine.multimodal.inputs import MultiModalInputs
from pageant.engine.prefix_cache import BASE_ROOT
from pageant.engine.sampling_params import SamplingParams

_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class OutputTokensView:
    """``output_token_ids`` and ``num_output_tokens`` of anything holding ``token_ids`` (prompt,
    then output) and its ``request``: a ``Sequence``, or the verifier's view of one with proposals
    appended (``spec_decode.verify.SpecView``)."""

    token_ids: list[int]
    request: "Request"

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens


@dataclass(eq=False)
class Sequence(OutputTokensView):
    """One completion being generated.

    Invariants: ``token_ids == prompt_token_ids + output_token_ids``; the first
    ``num_computed_tokens`` of them have their K/V in the blocks of ``block_table``;
    ``len(block_table) * block_size >= num_computed_tokens``.
    """

    request: "Request"
    index: int  # which sample of the request (0 .. num_samples - 1)
    token_ids: list[int]
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # prefix caching: hashes of the full blocks of ``token_ids`` (filled as blocks fill, see
    # prefix_cache.py) and how many leading blocks of ``block_table`` were offered to the cache
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # incremental detokenizer state (see detokenizer.py)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    output_text_len: int = 0  # how much of ``text`` may be shown (the rest may start a stop string)
    # what earlier ``RequestOutput``s already showed (``RequestOutputKind.DELTA``): output tokens,
    # characters of ``text``, and whether the finish reason was reported
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    finish_emitted: bool = False
    # speculative decoding (pageant.engine.spec_decode): this step's proposed next tokens, and how
    # many leading positions have the draft model's KV in its pool (reset by preemption)
    spec_token_ids: list[int] = field(default_factory=list)
    draft_num_computed: int = 0
    # the counter orders sequences that arrived at the same time (FCFS tie-break)
    order: int = field(default_factory=lambda: next(_counter))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple:
        """Scheduling order: lower priority value first, then arrival, then creation."""
        return (self.request.priority, self.request.metrics.arrival_time, self.order)


@dataclass(eq=False)
class Request:
    """A request: prompt, parameters and its sequences (one until the prompt is prefilled)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    metrics: RequestMetrics
    eos_token_ids: frozenset[int]
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    forked: bool = False
    lora_name: str | None = None  # the LoRA adapter applied to every sequence (None = base model)
    cache_root: bytes = BASE_ROOT  # parent hash of the first block: adapter identity + cache_salt
    pooling: "PoolingState | None" = None  # an embedding request (prefill only, never samples)
    grammar: "GrammarState | None" = None  # structured outputs: the compiled constraint and matchers
    mm_inputs: "MultiModalInputs | None" = None  # images (pageant.engine.multimodal): features, hashes, M-RoPE
    num_outputs: int = 0  # RequestOutputs made so far (RequestOutputKind.DELTA sends prompt logprobs once)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # (the usual case: one sample, or samples not forked yet)
            return seqs[0].status is SequenceStatus.FINISHED and (self.forked or self.params.num_samples == 1)
        return bool(seqs) and all(s.status is SequenceStatus.FINISHED for s in seqs) and (
            self.forked or self.params.num_samples == 1
        )

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and (
            self.prompt_logprobs is None or len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    def new_sequence(self, index: int, token_ids: list[int], generator: torch.Generator | None) -> Sequence:
        seq = Sequence(request=self, index=index, token_ids=token_ids, generator=generator)
        seq.prefix_offset = max(self.num_prompt_tokens - 5, 0)  # detokenizer start (see detokenizer.py)
        seq.read_offset = self.num_prompt_tokens
        if self.params.logprobs is not None:
            seq.logprobs = []
        self.seqs.append(seq)
        return seq


def make_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """The per-sample generator of a seeded request (sample 0 uses the seed itself)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((seed + index * 0x9E3779B97F4A7C15) % (2**63))
    return g
