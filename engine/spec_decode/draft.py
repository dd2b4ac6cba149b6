"""Draft-model proposals: a smaller checkpoint with the target's vocabulary proposes ``k`` tokens
autoregressively, then the target verifies them in one forward.

The draft has its own KV pool with the *same block ids* as the target's (its own tensor, sized
from the same memory budget: ``joint_runner_class`` makes the target's pool leave room for it), so
every block the scheduler allocates, shares, copies on write, frees on preemption or abort is
allocated, shared, freed for the draft too, with no bookkeeping of its own. Per sequence,
``draft_num_computed`` says how many leading positions hold the draft's KV; each step the draft
first catches up (prompt, accepted tokens, the last known token) in one batched forward whose last
logits give the first proposal, then runs ``k - 1`` one-token steps. The draft's KV only ever
shapes proposals, never outputs: a stale value could only lower the acceptance rate.

Greedy requests propose the draft's argmax; sampled requests sample the draft's distribution
(temperature, top-k/p, min-p of the request) and hand it to the rejection sampler as ``q``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from types import ModuleType, SimpleNamespace

import torch

from pageant.engine.config import EngineConfig, ModelConfig
from pageant.engine.layers.attention import kv_cache_torch_dtype
from pageant.engine.loader import resolve_model_path
from pageant.engine.model_runner import _DTYPES, ModelRunner
from pageant.engine.sampler import SamplingBatch, truncated_probs
from pageant.engine.scheduler import ScheduledSeq, SchedulerOutput
from pageant.engine.sequence import Sequence

_NO_REQUEST = SimpleNamespace(needs_prompt_logprobs=False, pooling=None, lora_name=None, num_prompt_tokens=0,
                              mm_inputs=None)


class _DraftSeq:
    """What the draft's runner reads of a sequence: its tokens so far (with proposals) and blocks."""

    index = 0
    request = _NO_REQUEST

    def __init__(self, seq: Sequence):
        self.token_ids = list(seq.token_ids)
        self.block_table = seq.block_table


def _draft_path(config: EngineConfig, model: str) -> pathlib.Path:
    return resolve_model_path(model, None, config.download_dir)


def draft_kv_bytes_per_block(config: EngineConfig, model: str) -> int:
    """Bytes one block of the draft's KV pool takes (all its layers, K and V)."""
    mc = ModelConfig.from_pretrained(_draft_path(config, model))
    elem = torch.empty((), dtype=kv_cache_torch_dtype("auto", _DTYPES[config.dtype])).element_size()
    return mc.num_layers * 2 * config.block_size * mc.num_kv_heads * mc.head_dim * elem


def joint_runner_class(config: EngineConfig, model: str) -> type[ModelRunner]:
    """A ``ModelRunner`` whose pool, sized from the memory budget, leaves room for a draft pool
    with as many blocks (each block costs the target's bytes plus the draft's)."""
    extra = draft_kv_bytes_per_block(config, model)

    class JointKVModelRunner(ModelRunner):
        def bytes_per_block(self) -> int:
            return super().bytes_per_block() + extra

    return JointKVModelRunner


class DraftProposer:
    """Loads the draft checkpoint and runs it on the rows that speculate this step."""

    def __init__(self, config: EngineConfig, model: str, target: ModelConfig, target_tokenizer, ops: ModuleType,
                 max_model_len: int, num_kv_blocks: int):
        path = _draft_path(config, model)
        mc = ModelConfig.from_pretrained(path)
        if mc.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model {model!r} has a vocabulary of {mc.vocab_size} tokens, the target "
                             f"{target.vocab_size}: speculative decoding needs the same vocabulary")
        self._check_tokenizer(path, target_tokenizer, model)
        cfg = dataclasses.replace(config, model=str(path), num_kv_blocks=num_kv_blocks, enable_lora=False,
                                  quantization=None, kv_cache_dtype="auto", speculative_config=None)
        self.runner = ModelRunner(cfg, mc, path, ops, max_model_len, None)
        self.vocab_size = mc.vocab_size

    @staticmethod
    def _check_tokenizer(path: pathlib.Path, target_tokenizer, model: str) -> None:
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return  # no tokenizer shipped with the draft: the vocabulary size is all we can check
        from transformers import AutoTokenizer

        draft_vocab = AutoTokenizer.from_pretrained(str(path)).get_vocab()
        if draft_vocab != target_tokenizer.get_vocab():
            raise ValueError(f"the draft model {model!r} has a different tokenizer vocabulary than the target: "
                             "speculative decoding needs the same vocabulary")

    def _forward(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, dict[int, int]]:
        scheduled = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first
        order = {id(s): i for i, s in enumerate(scheduled)}
        so = SchedulerOutput(scheduled=scheduled, num_decode_seqs=sum(s.num_new_tokens == 1 for s in scheduled),
                             num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
                             sample_rows=[(s.seq, i) for i, s in enumerate(scheduled)])
        logits = self.runner.execute(so, self.runner.prepare(so)).logits  # [rows, vocab], sorted order
        return logits, order

    def propose(self, rows: list[ScheduledSeq], blocks_to_copy: list[tuple[int, int]],
                generator: torch.Generator | None) -> dict[int, torch.Tensor]:
        """Fill each row's ``spec_token_ids`` (placeholders, already sized by the scheduler) with
        proposals; returns, per sampled row (by ``id(seq)``), the ``[k, vocab]`` draft probabilities."""
        if blocks_to_copy:  # the scheduler's copy-on-write, for the draft's pool too
            kv = self.runner.kv_cache
            src = torch.tensor([s for s, _ in blocks_to_copy], device=kv.device)
            dst = torch.tensor([d for _, d in blocks_to_copy], device=kv.device)
            kv[:, :, dst] = kv[:, :, src]
        device = self.runner.device
        seqs = [r.seq for r in rows]
        batch = SamplingBatch.build(seqs, self.vocab_size, device)
        drafts = [_DraftSeq(seq) for seq in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        ks = [len(r.spec_token_ids) for r in rows]
        for j in range(max(ks)):
            live = [i for i in range(len(rows)) if ks[i] > j]
            sched = []
            for i in live:
                num = seqs[i].num_tokens
                start = min(seqs[i].draft_num_computed, num - 1) if j == 0 else num - 1 + j
                sched.append(ScheduledSeq(drafts[i], start, len(drafts[i].token_ids) - start, sample=True))
            logits, order = self._forward(sched)
            logits = logits[[order[id(s)] for s in sched]]  # [len(live), vocab], in ``live`` order
            tokens = logits.argmax(dim=-1)  # [len(live)]
            if not batch.all_greedy:
                sub = _rows(batch, live, device)
                p = truncated_probs(logits, sub)  # [len(live), vocab]
                noise = torch.empty_like(p).exponential_(generator=generator)
                for n, i in enumerate(live):
                    if seqs[i].generator is not None:
                        noise[n].exponential_(generator=seqs[i].generator)
                tokens = torch.where(sub.greedy, tokens, (p / noise).argmax(dim=-1))
                for n, i in enumerate(live):
                    probs[i].append(p[n])
            for i, t in zip(live, tokens.tolist()):
                drafts[i].token_ids.append(t)
        out = {}
        for i, r in enumerate(rows):
            seq = r.seq
            r.spec_token_ids[:] = drafts[i].token_ids[seq.num_tokens :]
            seq.draft_num_computed = seq.num_tokens - 1 + ks[i]  # positions written by the draft
            if probs[i] and not seq.request.params.greedy:
                out[id(seq)] = torch.stack(probs[i])  # [k, vocab]
        return out


def _rows(batch: SamplingBatch, rows: list[int], device: torch.device) -> SimpleNamespace:
    """The truncation parameters of ``batch`` restricted to ``rows`` (what ``truncated_probs`` reads)."""
    idx = torch.tensor(rows, dtype=torch.long, device=device)

    def pick(t):
        return None if t is None else t[idx]

    return SimpleNamespace(temperature=batch.temperature[idx], greedy=batch.greedy[idx], top_k=pick(batch.top_k),
                           top_p=pick(batch.top_p), min_p=pick(batch.min_p))
