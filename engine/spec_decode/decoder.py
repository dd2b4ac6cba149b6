"""``SpecDecoder``: speculative decoding's part of the engine step.

``propose`` (before scheduling) gives each decoding sequence its proposals (n-gram) or as many
placeholders (draft model); the scheduler computes them after the sequence's last known token as
its budget and the pool allow (``ScheduledSeq.spec_token_ids``), allocating their slots but counting
only known tokens as computed. ``draft`` (after scheduling) runs the draft model to fill the
placeholders. The target's forward then scores every position, ``verify`` turns that into each
row's emitted tokens, and ``apply`` appends them one at a time through the normal stop rules (a
stop token, string, ``max_tokens`` or the context end inside an accepted run ends the request
right there); a sequence that goes on counts the accepted tokens computed, releases the slots of
the rejected ones (``BlockManager.trim``) and registers its now full blocks in the prefix cache.
Nothing about a rejected token survives the step.

Requests with structured outputs speculate too: each verified position is masked by the grammar's
state after the proposals before it (the matcher walks them and rolls back), the accepted run
advances the matcher, and a run that completes the constraint ends the request there ("stop"). A
request whose constraint starts after a reasoning section speculates once it is constrained.
Embedding requests never speculate; everything else (penalties, logit_bias, min_tokens, logprobs,
LoRA, n > 1, seeds) does.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from pageant.engine.scheduler import Scheduler, SchedulerOutput
from pageant.engine.spec_decode.config import SpeculativeConfig
from pageant.engine.spec_decode.metrics import SpecDecodingStats
from pageant.engine.spec_decode.ngram import NgramProposer
from pageant.engine.spec_decode.verify import VerifiedRow, verify

if TYPE_CHECKING:
    from pageant.engine.engine import LLMEngine


class SpecDecoder:
    """One engine's proposer (n-gram or draft model), verifier and counters."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft=None):
        self.config = config
        self.max_model_len = max_model_len
        self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max) \
            if config.method == "ngram" else None
        self.draft_proposer = draft  # a DraftProposer for method "draft_model"
        self.stats = SpecDecodingStats(config.num_speculative_tokens)
        self._draft_probs: dict[int, torch.Tensor] = {}

    @classmethod
    def build(cls, engine: "LLMEngine", ops) -> "SpecDecoder":
        config = SpeculativeConfig.from_dict(engine.config.speculative_config)
        draft = None
        if config.method == "draft_model":
            from pageant.engine.spec_decode.draft import DraftProposer

            draft = DraftProposer(engine.config, config.model, engine.model_config, engine.tokenizer.hf_tokenizer,
                                  ops, engine.config.max_model_len, engine.runner.num_kv_blocks)
        return cls(config, engine.config.max_model_len, draft)

    # ------------------------------------------------------------------ before the forward
    def propose(self, scheduler: Scheduler) -> None:
        """Set ``spec_token_ids`` of every running sequence (empty where it does not speculate)."""
        limit = self.config.disable_by_batch_size
        enabled = limit is None or len(scheduler.running) <= limit
        for seq in scheduler.running:
            seq.spec_token_ids = []
            request = seq.request
            grammar = request.grammar  # constrained: once its matcher runs (not inside a reasoning section)
            if (not enabled or seq.num_tokens - seq.num_computed_tokens != 1 or request.pooling is not None
                    or (grammar is not None and grammar.reasoning_end is not None and seq.index not in grammar.matchers)):
                continue
            # never past max_tokens or the context: this step emits at most k + 1 tokens
            k = min(self.config.num_speculative_tokens, request.params.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - seq.num_tokens - 1)
            if k > 0:
                seq.spec_token_ids = self.ngram.propose(seq.token_ids, k) if self.ngram is not None else [0] * k

    def schedule(self, scheduler: Scheduler) -> SchedulerOutput:
        """Propose, then schedule (proposals ride along with their sequences' decodes)."""
        self.propose(scheduler)
        return scheduler.schedule()

    @staticmethod
    def speculating(so: SchedulerOutput) -> bool:
        return any(s.spec_token_ids for s in so.scheduled)

    def draft(self, so: SchedulerOutput, generator: torch.Generator | None) -> None:
        """Run the draft model on the scheduled proposals (no-op for n-gram)."""
        self._draft_probs = {}
        if self.draft_proposer is not None:
            rows = [s for s in so.scheduled if s.spec_token_ids]
            if rows:
                self._draft_probs = self.draft_proposer.propose(rows, so.blocks_to_copy, generator)

    # ------------------------------------------------------------------ after the forward
    def verify(self, so: SchedulerOutput, logits: torch.Tensor, vocab_size: int, generator: torch.Generator | None,
               structured) -> tuple[list[VerifiedRow], list]:
        """Each sample row's emitted tokens; and the constrained sequences whose grammar completed."""
        seqs = [seq for seq, _ in so.sample_rows]
        drafts = [list(so.scheduled[idx].spec_token_ids) for _, idx in so.sample_rows]
        mask = structured.bitmask_proposals(seqs, drafts) if structured is not None else None
        probs = [self._draft_probs.get(id(seq)) for seq in seqs] if self._draft_probs else None
        rows = verify(logits, seqs, drafts, vocab_size, generator, mask, probs)
        completed = []
        if mask is not None:  # advance the matchers; a run that completes its constraint ends there
            for i, (seq, row) in enumerate(zip(seqs, rows)):
                end = structured.accept_run(seq, row.token_ids)
                if end is not None:
                    completed.append(seq)
                    n = end + 1
                    rows[i] = dataclasses.replace(row, token_ids=row.token_ids[:n], logprobs=row.logprobs[:n],
                                                  ranks=row.ranks[:n], top=row.top[:n],
                                                  num_accepted=min(row.num_accepted, n - 1))
        return rows, completed

    def apply(self, engine: "LLMEngine", so: SchedulerOutput, rows: list[VerifiedRow]) -> list:
        """Append the emitted tokens (stop rules per token); the requests touched, in order."""
        now = time.time()
        bm = engine.block_manager
        touched = {}
        for (seq, _), row in zip(so.sample_rows, rows):
            self.stats.observe(row.num_draft, row.num_accepted)
            emitted = 0
            for token, lp, rank, top in zip(row.token_ids, row.logprobs, row.ranks, row.top):
                emitted += 1
                if engine.outputs.append_token(seq, token, lp, rank, top, now, engine.scheduler):
                    break
            engine.generation_tokens_total += emitted - 1  # the engine counted one per row
            touched[seq.request_id] = seq.request
            if row.num_draft and not seq.is_finished:
                seq.num_computed_tokens += emitted - 1  # the accepted proposals' KV is now the sequence's
                seq.draft_num_computed = min(seq.draft_num_computed, seq.num_computed_tokens)
                bm.trim(seq)  # the rejected proposals' slots
                bm.cache_blocks(seq)
        return list(touched.values())
