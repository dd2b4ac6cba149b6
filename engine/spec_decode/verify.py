"""Verification: one target forward scored ``k + 1`` positions of each speculating row; turn those
logits into the tokens each row emits this step, with their logprobs.

Each position is processed exactly as the normal sampler would process that token's logits
(logit_bias, min_tokens, penalties over the output *including the proposals before it*,
temperature / top-k / top-p / min-p), so the verified distribution is the one decoding without
speculation samples from. Constrained (structured-output) rows never carry proposals here: they
have one position and take the bitmask as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pageant.engine.sampler import SamplingBatch, apply_processors, truncated_probs
from pageant.engine.sequence import OutputTokensView, Sequence
from pageant.engine.spec_decode.rejection_sampler import rejection_sample
from pageant.engine.structured_outputs.manager import apply_bitmask


class SpecView(OutputTokensView):
    """A sequence as it would be after its first proposals were accepted (what the sampler's
    processors read at a later verified position)."""

    def __init__(self, seq: Sequence, extra: list[int]):
        self.seq, self.request, self.index, self.generator = seq, seq.request, seq.index, seq.generator
        self.token_ids = seq.token_ids + extra
        self.text = seq.text


@dataclass
class VerifiedRow:
    """What one sample row emits this step: tokens in order, their logprobs, ranks and top lists."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int | None]
    top: list[tuple[list[int], list[float]] | None]
    num_draft: int
    num_accepted: int


def verify(
    logits: torch.Tensor,  # [sum(1 + k_i), vocab] float32, row i's k_i + 1 positions back to back
    seqs: list[Sequence],
    drafts: list[list[int]],  # per row its proposals (k_i tokens, maybe none)
    vocab_size: int,
    generator: torch.Generator | None,
    bitmask: torch.Tensor | None = None,  # [num_flat_rows, words] int32 (structured outputs)
    draft_probs: list[torch.Tensor | None] | None = None,  # per row [k_i, vocab] or None (one-hot)
) -> list[VerifiedRow]:
    device = logits.device
    views = [v for seq, d in zip(seqs, drafts) for v in [seq, *(SpecView(seq, d[:j]) for j in range(1, len(d) + 1))]]
    batch = SamplingBatch.build(views, vocab_size, device)
    logits = apply_processors(logits, batch)
    if bitmask is not None:
        apply_bitmask(logits, bitmask)
    ks = [len(d) for d in drafts]
    num_rows, max_k = len(seqs), max(ks)
    offsets = [0]
    for k in ks:
        offsets.append(offsets[-1] + k + 1)
    # [num_rows, max_k + 1]: each row's flat positions, padded with its last one
    pad = torch.tensor([[offsets[i] + min(j, ks[i]) for j in range(max_k + 1)] for i in range(num_rows)],
                       dtype=torch.long, device=device)
    argmax = logits.argmax(dim=-1)  # [num_flat_rows]
    greedy = torch.tensor([s.request.params.greedy for s in seqs], dtype=torch.bool, device=device)
    draft_ids = torch.tensor([d + [0] * (max_k - len(d)) for d in drafts], dtype=torch.long,
                             device=device).reshape(num_rows, max_k)
    num_draft = torch.tensor(ks, dtype=torch.long, device=device)
    target_probs = uniform = noise = q = None
    if not batch.all_greedy:
        target_probs = truncated_probs(logits, batch)[pad]  # [num_rows, max_k + 1, vocab]
        uniform = torch.rand(num_rows, max_k, device=device, generator=generator)
        noise = torch.empty(num_rows, logits.shape[-1], device=device).exponential_(generator=generator)
        for i, seq in enumerate(seqs):  # seeded rows: their own draws, as many as they use
            if seq.generator is not None and not seq.request.params.greedy:
                uniform[i, : ks[i]].uniform_(generator=seq.generator)
                noise[i].exponential_(generator=seq.generator)
        if draft_probs is not None and any(dp is not None for dp in draft_probs):
            q = torch.zeros(num_rows, max_k, logits.shape[-1], device=device)
            for i, dp in enumerate(draft_probs):
                if dp is not None:
                    q[i, : dp.shape[0]] = dp
    num_accepted, final = rejection_sample(target_probs, argmax[pad], draft_ids, num_draft, greedy, uniform, noise, q)
    num_accepted, final = num_accepted.tolist(), final.tolist()  # the step's device -> host sync
    tokens = [drafts[i][: num_accepted[i]] + [final[i]] for i in range(num_rows)]
    flat = torch.tensor([offsets[i] + j for i in range(num_rows) for j in range(len(tokens[i]))], device=device)
    chosen = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=device)
    sub = logits[flat]  # [num_emitted, vocab]
    lp = sub.gather(-1, chosen[:, None])[:, 0] - sub.logsumexp(dim=-1)  # [num_emitted]
    want = [e for e, (i, j) in enumerate((i, j) for i in range(num_rows) for j in range(len(tokens[i])))
            if seqs[i].request.params.logprobs is not None]
    ranks: dict[int, int] = {}
    tops: dict[int, tuple[list[int], list[float]]] = {}
    if want:
        w = torch.tensor(want, device=device)
        lps = sub[w].log_softmax(dim=-1)  # [num_want, vocab]
        chosen_lp = lps.gather(-1, chosen[w][:, None])  # [num_want, 1]
        lp[w] = chosen_lp[:, 0]  # (as the sampler reports them: from the same log_softmax)
        rank = ((lps > chosen_lp).sum(dim=-1) + 1).tolist()
        kmax = max(s.request.params.logprobs or 0 for s in seqs)
        top_lp, top_ids = lps.topk(kmax, dim=-1) if kmax else (lps[:, :0], lps[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for j, e in enumerate(want):
            ranks[e] = rank[j]
            tops[e] = (top_ids[j], top_lp[j])
    lp = lp.tolist()
    out, e = [], 0
    for i in range(num_rows):
        n, k = len(tokens[i]), seqs[i].request.params.logprobs
        top = [(tops[x][0][:k], tops[x][1][:k]) if x in tops else None for x in range(e, e + n)]
        out.append(VerifiedRow(tokens[i], lp[e : e + n], [ranks.get(x) for x in range(e, e + n)], top, ks[i],
                               num_accepted[i]))
        e += n
    return out
