"""Token sampling, vectorised over the batch.

Order for each row: logit_bias, min_tokens (stop tokens masked), penalties (repetition over
prompt + output, presence/frequency over output) give the *processed* logits; reported logprobs
are ``log_softmax`` of those. Greedy rows take the argmax. Random rows divide by the temperature,
keep the ``top_k`` most likely tokens, then the smallest set whose mass reaches ``top_p``, then
drop tokens below ``min_p`` times the top probability, and sample with the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which is exact. Seeded rows draw their ``q`` from their own
``torch.Generator``, so their tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from pageant.engine.structured_outputs.manager import apply_bitmask

from dataclasses import dataclass

import torch

from pageant.engine.sampling_params import _GREEDY_EPS
from pageant.engine.sequence import Sequence


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, built once per step by ``SamplingBatch.build``."""

    temperature: torch.Tensor  # [num_rows] float32 (1.0 on greedy rows)
    greedy: torch.Tensor  # [num_rows] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [num_rows] int64, vocab_size where off; None if no row uses it
    top_p: torch.Tensor | None  # [num_rows] float32
    min_p: torch.Tensor | None  # [num_rows] float32
    generators: list[tuple[int, torch.Generator]]  # (row, generator) for seeded random rows
    bias: list[tuple[int, torch.Tensor, torch.Tensor]]  # (row, token ids, values)
    masked: list[tuple[int, torch.Tensor]]  # (row, token ids forbidden by min_tokens)
    penalty_rows: torch.Tensor | None  # [num_penalised] int64
    presence: torch.Tensor | None  # [num_penalised] float32
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    output_counts: torch.Tensor | None  # [num_penalised, vocab] float32
    prompt_mask: torch.Tensor | None  # [num_penalised, vocab] bool
    num_logprobs: list[int | None]  # per row: top alternatives wanted (None = none)

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> "SamplingBatch":
        params = [s.request.params for s in seqs]
        greedy, temps, random_rows, bias, masked, pen = [], [], [], [], [], []
        for i, (seq, p) in enumerate(zip(seqs, params)):  # one pass over the rows
            g = p.temperature < _GREEDY_EPS  # (p.greedy)
            greedy.append(g)
            temps.append(1.0 if g else p.temperature)
            if not g:
                random_rows.append(i)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=device)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
                bias.append((i, ids, vals))
            if p.min_tokens and len(seq.token_ids) - len(seq.request.prompt_token_ids) < p.min_tokens:
                stop = set(p.stop_ids) | (set() if p.ignore_eos else set(seq.request.eos_token_ids))
                if stop:
                    masked.append((i, torch.tensor(sorted(stop), dtype=torch.int64, device=device)))
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
                pen.append(i)

        def column(values, dtype, used):
            return torch.tensor(values, dtype=dtype, device=device) if used else None

        top_k = top_p = min_p = None
        generators = []
        if random_rows:
            top_k_vals = [p.top_k if p.top_k > 0 else vocab_size for p in params]
            top_k = column(top_k_vals, torch.int64, any(top_k_vals[i] < vocab_size for i in random_rows))
            top_p = column([p.top_p if p.top_p < 1 else 2.0 for p in params], torch.float32,
                           any(params[i].top_p < 1 for i in random_rows))
            min_p = column([p.min_p for p in params], torch.float32, any(params[i].min_p > 0 for i in random_rows))
            generators = [(i, seqs[i].generator) for i in random_rows if seqs[i].generator is not None]

        presence = frequency = repetition = counts = prompt_mask = rows = None
        if pen:
            rows = torch.tensor(pen, dtype=torch.int64, device=device)
            presence = torch.tensor([params[i].presence_penalty for i in pen], device=device)
            frequency = torch.tensor([params[i].frequency_penalty for i in pen], device=device)
            repetition = torch.tensor([params[i].repetition_penalty for i in pen], device=device)
            counts = torch.zeros(len(pen), vocab_size, device=device)
            prompt_mask = torch.zeros(len(pen), vocab_size, dtype=torch.bool, device=device)
            for j, i in enumerate(pen):
                out = seqs[i].output_token_ids
                if out:
                    idx = torch.tensor(out, dtype=torch.int64, device=device)
                    counts[j].index_add_(0, idx, torch.ones(len(out), device=device))
                prompt_mask[j, torch.tensor(seqs[i].request.prompt_token_ids, device=device)] = True
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=not random_rows,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            bias=bias,
            masked=masked,
            penalty_rows=rows,
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            output_counts=counts,
            prompt_mask=prompt_mask,
            num_logprobs=[p.logprobs for p in params],
        )


@dataclass
class SamplerOutput:
    """Per row: the chosen token, its logprob and rank, and the top alternatives if asked for."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int | None]
    top: list[tuple[list[int], list[float]] | None]


def apply_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, min_tokens and penalties, in place on ``logits`` [num_rows, vocab]."""
    for row, ids, vals in batch.bias:
        logits[row].index_add_(0, ids, vals)
    for row, ids in batch.masked:
        logits[row, ids] = float("-inf")
    if batch.penalty_rows is not None:
        sub = logits[batch.penalty_rows]  # [num_penalised, vocab]
        seen = batch.prompt_mask | (batch.output_counts > 0)
        rep = batch.repetition[:, None].expand_as(sub)
        penalised = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalised, sub)
        sub = sub - batch.frequency[:, None] * batch.output_counts
        sub = sub - batch.presence[:, None] * (batch.output_counts > 0).float()
        logits[batch.penalty_rows] = sub
    return logits


def truncated_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after temperature, top_k, top_p and min_p ([num_rows, vocab])."""
    logits = logits / batch.temperature[:, None]
    if batch.top_k is not None or batch.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if batch.top_k is not None:
            ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            remove |= ranks >= batch.top_k[:, None]
        if batch.top_p is not None:
            probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
            remove |= mass_before >= batch.top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None,
           token_bitmask: torch.Tensor | None = None) -> SamplerOutput:
    """Pick one token per row of ``logits`` ([num_rows, vocab] float32; modified in place).
    ``token_bitmask`` (structured outputs, int32 ``[num_rows, ceil(vocab / 32)]``) sends the
    tokens a row's constraint forbids to -inf after the processors, so sampling and logprobs are
    the model's distribution renormalised over the allowed tokens."""
    logits = apply_processors(logits, batch)
    if token_bitmask is not None:
        apply_bitmask(logits, token_bitmask)
    if batch.all_greedy and all(k is None for k in batch.num_logprobs):  # fast path: no [rows, vocab] log_softmax
        chosen = logits.argmax(dim=-1)  # [num_rows]
        chosen_lp = logits.gather(-1, chosen[:, None])[:, 0] - logits.logsumexp(dim=-1)  # [num_rows]
        n = len(batch.num_logprobs)
        return SamplerOutput(chosen.tolist(), chosen_lp.tolist(), [None] * n, [None] * n)
    logprobs = logits.log_softmax(dim=-1)  # [num_rows, vocab]
    chosen = logits.argmax(dim=-1)  # [num_rows]
    if not batch.all_greedy:
        probs = truncated_probs(logits, batch)
        q = torch.empty_like(probs).exponential_(generator=generator)
        for row, gen in batch.generators:
            q[row].exponential_(generator=gen)
        sampled = (probs / q).argmax(dim=-1)
        chosen = torch.where(batch.greedy, chosen, sampled)
    chosen_lp = logprobs.gather(-1, chosen[:, None])  # [num_rows, 1]
    want = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
    ranks: list[int | None] = [None] * len(batch.num_logprobs)
    top: list[tuple[list[int], list[float]] | None] = [None] * len(batch.num_logprobs)
    token_ids, token_lps = chosen.tolist(), chosen_lp[:, 0].tolist()  # the step's one device -> host sync
    if want:
        rows = torch.tensor(want, device=logits.device)
        sub = logprobs[rows]  # [num_want, vocab]
        rank = ((sub > chosen_lp[rows]).sum(dim=-1) + 1).tolist()
        kmax = max(batch.num_logprobs[i] for i in want)
        top_lp, top_ids = sub.topk(kmax, dim=-1) if kmax > 0 else (sub[:, :0], sub[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()  # whole tensors: no per-row transfers
        for j, i in enumerate(want):
            k = batch.num_logprobs[i]
            ranks[i] = rank[j]
            top[i] = (top_ids[j][:k], top_lp[j][:k])
    return SamplerOutput(token_ids, token_lps, ranks, top)


def prompt_logprobs(
    logits: torch.Tensor,  # [num_positions, vocab] float32: the raw logits at prompt positions
    targets: torch.Tensor,  # [num_positions] int64: the prompt token that follows each position
    k: int,
) -> tuple[list[float], list[int], list[int], list[list[int]], list[list[float]]]:
    """Logprob and rank of each next prompt token, and the top ``k`` alternatives."""
    lp = logits.log_softmax(dim=-1)
    target_lp = lp.gather(-1, targets[:, None])  # [num_positions, 1]
    ranks = ((lp > target_lp).sum(dim=-1) + 1).tolist()
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    return target_lp[:, 0].tolist(), targets.tolist(), ranks, top_ids.tolist(), top_lp.tolist()
