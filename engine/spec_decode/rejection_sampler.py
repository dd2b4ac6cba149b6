"""Rejection sampling of proposed tokens (Leviathan et al., 2023, "Fast Inference from Transformers
via Speculative Decoding"), vectorised over the batch.

Each row ``b`` proposed ``num_draft[b]`` tokens ``d_1 .. d_k`` drawn from the draft distributions
``q_j``; the target model gave ``p_0 .. p_k`` (``p_j`` predicts the token after ``d_j``). Draft
token ``d_{j+1}`` is accepted with probability ``min(1, p_j(d) / q_j(d))``; at the first rejection
the row emits a token from the residual ``max(p_j - q_j, 0)`` (renormalised) and stops; if all are
accepted it emits a bonus token from ``p_k``. Every emitted token is then distributed exactly as if
sampled from the target one at a time. ``draft_probs=None`` means deterministic proposals (n-gram,
greedy drafts): ``q_j`` is one-hot on ``d_{j+1}``, so acceptance is ``p_j(d)`` and the residual is
``p_j`` without ``d``. Greedy rows accept while ``d`` equals the target's argmax and then emit the
argmax: exactly the tokens greedy decoding gives.

Randomness comes in as tensors (``uniform`` for acceptance, ``exponential`` noise for the
exponential-race sample of the final token), so seeded rows draw them from their own generator.
"""

from __future__ import annotations

import torch


def rejection_sample(
    target_probs: torch.Tensor | None,  # [num_rows, max_k + 1, vocab] float32; None: every row greedy
    target_argmax: torch.Tensor,  # [num_rows, max_k + 1] int64
    draft_token_ids: torch.Tensor,  # [num_rows, max_k] int64 (padding past num_draft ignored)
    num_draft: torch.Tensor,  # [num_rows] int64
    greedy: torch.Tensor,  # [num_rows] bool
    uniform: torch.Tensor,  # [num_rows, max_k] float32 in [0, 1)
    exponential: torch.Tensor,  # [num_rows, vocab] float32, Exp(1) noise
    draft_probs: torch.Tensor | None = None,  # [num_rows, max_k, vocab]; None: one-hot proposals
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(num_accepted [num_rows], final_token [num_rows])``: row ``b`` emits
    ``d_1 .. d_{num_accepted}`` then ``final_token``."""
    num_rows, max_k = draft_token_ids.shape
    device = draft_token_ids.device
    rows = torch.arange(num_rows, device=device)
    if target_probs is None:  # all greedy: the longest prefix equal to the argmax, then the argmax
        ok = (draft_token_ids == target_argmax[:, :max_k]) & (torch.arange(max_k, device=device) < num_draft[:, None])
        num_accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # [num_rows]
        return num_accepted, target_argmax[rows, num_accepted]
    if max_k:
        p_draft = target_probs[:, :max_k].gather(-1, draft_token_ids[:, :, None])[:, :, 0]  # [num_rows, max_k]
        if draft_probs is None:
            q_draft = torch.ones_like(p_draft)
        else:
            q_draft = draft_probs.gather(-1, draft_token_ids[:, :, None])[:, :, 0]  # [num_rows, max_k]
        random_ok = uniform * q_draft < p_draft  # u < p / q
        greedy_ok = draft_token_ids == target_argmax[:, :max_k]
        ok = torch.where(greedy[:, None], greedy_ok, random_ok)
        ok &= torch.arange(max_k, device=device)[None, :] < num_draft[:, None]
        num_accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # [num_rows]: leading accepted proposals
    else:
        num_accepted = torch.zeros(num_rows, dtype=torch.long, device=device)
    p = target_probs[rows, num_accepted]  # [num_rows, vocab]: the target at the emitting position
    rejected = num_accepted < num_draft  # [num_rows]
    if max_k:
        at = num_accepted.clamp(max=max_k - 1)
        if draft_probs is None:
            q = torch.zeros_like(p).scatter_(-1, draft_token_ids[rows, at][:, None], 1.0)  # [num_rows, vocab]
        else:
            q = draft_probs[rows, at]
        residual = (p - q).clamp(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)  # (p == q: rejection impossible)
        p = torch.where(rejected[:, None], residual, p)
    sampled = (p / exponential).argmax(dim=-1)  # [num_rows]: exponential race, exact
    final = torch.where(greedy, target_argmax[rows, num_accepted], sampled)
    return num_accepted, final
