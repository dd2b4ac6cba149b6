"""Iteration-level scheduler: which sequences run in the next step and how many tokens each.

Policy (one call to ``schedule`` per engine step):

1. Running sequences first, in priority/arrival order: each gets what it still needs (one token
   for a decode, the next chunk for a prompt being prefilled), within the token budget
   ``max_num_batched_tokens`` and the cap ``max_num_seqs``. If the pool has no block for one, the
   lowest-priority/newest running sequence is preempted (its blocks freed; it is recomputed
   later, with identical results) until it fits.
2. Then waiting sequences (FCFS within priority), each with as much of its prompt as the budget
   allows (chunked prefill), as long as the pool can hold it. A waiting sequence that does not
   fit blocks those behind it (no overtaking). Nothing new is admitted in a step that preempted.
   With LoRA, the running set never uses more than ``max_loras`` distinct adapters: a waiting
   sequence whose adapter would exceed that is skipped for this step (later ones may go first,
   as in vLLM), so every batch fits the device's adapter slots. A request whose structured-output
   grammar is still compiling is skipped the same way.
3. With prefix caching, a waiting sequence first takes its cached leading blocks (they cost no
   token budget), then computes the rest. Requests that want prompt logprobs skip the lookup
   (they need logits at every prompt position). Full blocks are registered in the cache as soon
   as the step computing them is scheduled, so a request admitted later in the same step already
   shares them (each layer writes the whole batch's KV before attending); if that step fails, the
   engine un-registers them (``SchedulerOutput.cached_blocks``).

``num_computed_tokens`` is advanced here, when the work is scheduled. The batch puts single-token
sequences first (``num_decode_seqs``), as the attention kernels expect.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from pageant.engine.block_manager import BlockManager
from pageant.engine.sequence import Request, Sequence, SequenceStatus, make_generator


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence in a step: it computes tokens ``[start, start + num_new_tokens)``."""

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool  # this step reaches the end of its known tokens: sample the next one
    # speculative decoding: proposed tokens computed after the last known one (verified, then
    # accepted or rejected, by this step's sampling); ``num_new_tokens`` counts them too. Empty
    # (the shared ``()``) for a sequence that does not speculate this step.
    spec_token_ids: list[int] | tuple[()] = ()


@dataclass
class SchedulerOutput:
    """What the model runner executes this step (decodes first) and what gets sampled.

    ``sample_rows`` pairs each sequence that receives a token with the index (into
    ``scheduled``) of the sequence whose last query token's logits it samples from: itself, or
    its parent for samples forked this step.
    """

    scheduled: list[ScheduledSeq]
    num_decode_seqs: int
    num_batched_tokens: int
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    sample_rows: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    cached_blocks: list[int] = field(default_factory=list)  # registered in the prefix cache this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues and the block manager."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int = 0):
        self.block_manager = block_manager
        self.max_loras = max_loras  # distinct LoRA adapters allowed among running sequences
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []
        self._running_sorted = True  # running is in sort_key order (appends clear it; pops and removals keep it)
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queues
    def add_request(self, request: Request) -> None:
        for seq in request.seqs:
            self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_num_computed = 0  # the draft model's KV went with the blocks
        self.num_preemptions += 1
        self._enqueue(seq)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        chosen: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        newly_cached: list[int] = []
        preempted: list[Sequence] = []

        if not self._running_sorted:  # (a steady decode batch skips the sort)
            self.running.sort(key=lambda s: s.sort_key)
            self._running_sorted = True
        i = 0
        bs, ref_counts, caching = bm.block_size, bm.ref_counts, bm.enable_caching
        while i < len(self.running) and budget > 0 and len(chosen) < self.max_num_seqs:
            seq = self.running[i]
            nc = seq.num_computed_tokens
            num_left = len(seq.token_ids) - nc
            if num_left == 1 and not seq.spec_token_ids:
                # the steady decode: one token into a private block it already owns needs no
                # allocation (the general path below gives the same result, with more Python)
                table = seq.block_table
                b = nc // bs
                if b < len(table) and ref_counts[table[b]] == 1:
                    seq.num_computed_tokens = nc + 1
                    if caching and (nc + 1) % bs == 0:
                        newly_cached += bm.cache_blocks(seq)
                    chosen.append(ScheduledSeq(seq, nc, 1, True))
                    budget -= 1
                    i += 1
                    continue
            num_new = min(num_left, budget)
            # a decode with proposals (speculative decoding) computes them too, as budget and pool
            # allow (proposals never preempt anyone)
            spec = seq.spec_token_ids[: budget - 1] if num_left == 1 and seq.spec_token_ids else []
            if spec and not bm.can_allocate(seq, 1 + len(spec)):
                spec = []
            num_new += len(spec)
            while not bm.can_allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self._take(seq, num_new, chosen, copies, newly_cached, spec)
            budget -= num_new
            i += 1

        loras = {s.request.lora_name for s in self.running} - {None}
        w = 0  # index into waiting: sequences skipped for the LoRA cap stay queued
        while not preempted and w < len(self.waiting) and budget > 0 and len(chosen) < self.max_num_seqs:
            seq = self.waiting[w]
            lora = seq.request.lora_name
            if lora is not None and lora not in loras and len(loras) >= self.max_loras:
                w += 1
                continue
            grammar = seq.request.grammar
            if grammar is not None and (not grammar.ready or grammar.error is not None):
                w += 1  # its constraint is still compiling (or failed: the engine drops it)
                continue
            cached = self._lookup(seq)
            num_new = min(seq.num_tokens - len(cached or ()) * bm.block_size, budget)
            if not bm.can_allocate(seq, num_new, cached or []):
                break
            self.waiting.pop(w)
            if lora is not None:
                loras.add(lora)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._running_sorted = False
            if cached is not None:
                bm.admit(seq, cached)
            self._take(seq, num_new, chosen, copies, newly_cached)
            budget -= num_new

        # single-token sequences first (stable), as the decode kernel expects
        num_decode = sum(1 for s in chosen if s.num_new_tokens == 1)
        if num_decode not in (0, len(chosen)):
            chosen.sort(key=lambda s: s.num_new_tokens != 1)
        sample_rows: list[tuple[Sequence, int]] = []
        for idx, s in enumerate(chosen):
            if s.sample:
                request = s.seq.request
                if request.pooling is None:  # embedding requests pool, never sample
                    sample_rows.append((s.seq, idx))
                    if not request.forked and request.params.num_samples > 1:
                        sample_rows.extend((child, idx) for child in self._fork_if_needed(s.seq))
        return SchedulerOutput(
            scheduled=chosen,
            num_decode_seqs=num_decode,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            blocks_to_copy=copies,
            sample_rows=sample_rows,
            preempted=preempted,
            cached_blocks=newly_cached,
        )

    def _lookup(self, seq: Sequence) -> list[int] | None:
        """The cached leading blocks of a waiting sequence; None when it does not use the cache
        (caching off, or it needs prompt logprobs or a MEAN/CLS embedding and so must compute
        every prompt position)."""
        pooling = seq.request.pooling
        if (not self.block_manager.enable_caching or seq.request.needs_prompt_logprobs
                or (pooling is not None and pooling.needs_every_token)):
            return None
        return self.block_manager.lookup(seq)

    def _take(self, seq: Sequence, num_new: int, chosen: list[ScheduledSeq], copies: list[tuple[int, int]],
              newly_cached: list[int], spec: list[int] = ()) -> None:
        copies += self.block_manager.allocate(seq, num_new)
        start = seq.num_computed_tokens
        # proposals are not known tokens: only the verified ones are counted computed (and cached),
        # after sampling (see pageant.engine.spec_decode)
        seq.num_computed_tokens += num_new - len(spec)
        newly_cached += self.block_manager.cache_blocks(seq)
        chosen.append(ScheduledSeq(seq, start, num_new, seq.num_computed_tokens == seq.num_tokens,
                                   list(spec) if spec else ()))
        if seq.request.metrics.first_scheduled_time is None:
            seq.request.metrics.first_scheduled_time = time.time()

    def _fork_if_needed(self, seq: Sequence) -> list[Sequence]:
        """When the first sample's prompt is computed, create the other samples sharing its blocks."""
        request = seq.request
        if request.forked or request.params.num_samples == 1:
            return []
        request.forked = True
        children = []
        for index in range(1, request.params.num_samples):
            gen = make_generator(request.params.seed, index, seq.generator.device) if seq.generator else None
            child = request.new_sequence(index, list(seq.token_ids), gen)
            child.num_computed_tokens = seq.num_computed_tokens
            self.block_manager.fork(seq, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            self._running_sorted = False
            children.append(child)
        return children
