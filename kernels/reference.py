"""Plain PyTorch reference kernels: the CPU path of the engine and the ground truth for Triton.

Every function here has a Triton twin in ``pageant.kernels.triton_ops`` with the same signature.
See the package docstring for the KV-cache layout.

FP8 KV cache: a ``float8_e4m3fn`` cache holds ``x / scale`` (``k_scale`` / ``v_scale``: float32
one-element tensors, None meaning 1.0), clamped to the e4m3 range (+-448, so a too-large value
saturates instead of becoming NaN) and rounded to nearest even; reads multiply by the scale again.
Other caches ignore the scales (vLLM's "auto").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pageant.kernels.attention_masks import check_attention_options, visible_keys
from pageant.kernels.moe_reference import fused_moe, select_experts  # noqa: F401

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:  # same shape, float8_e4m3fn
    """``x / scale`` in float32, clamped to +-448, rounded to the nearest e4m3 value (ties to even)."""
    x32 = x.float() if scale is None else x.float() / scale
    return x32.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return quantize_fp8(x, scale) if cache.dtype == FP8_DTYPE else x.to(cache.dtype)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; a negative slot means "do not write"
    *,
    k_scale: torch.Tensor | None = None,  # [] or [1] float32: an FP8 cache holds key / k_scale
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write each token's key and value into its slot of the paged cache (in place); an FP8 cache
    gets them quantized (see the module docstring)."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])  # [num_slots, kvh, d]
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_new, v_new = _to_cache(key, k_cache, k_scale), _to_cache(value, v_cache, v_scale)
    if k_cache.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel: copy the bytes
        k_flat, v_flat, k_new, v_new = (t.view(torch.uint8) for t in (k_flat, v_flat, k_new, v_new))
    k_flat.index_copy_(0, slot_mapping, k_new)
    v_flat.index_copy_(0, slot_mapping, v_new)


def _gather_context(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [num_seqs, num_blocks_needed] int32
    scale: torch.Tensor | None = None,  # an FP8 cache's dequantization scale (None: 1.0)
) -> torch.Tensor:  # [num_seqs, num_blocks_needed * block_size, num_kv_heads, head_dim]
    """The sequences' pages in order; an FP8 cache's come back dequantized, in float32."""
    num_seqs, nb = block_table.shape
    rows = cache.view(cache.shape[0], -1).index_select(0, block_table.reshape(-1).long())  # one copy
    rows = rows.view(num_seqs, nb * cache.shape[1], *cache.shape[2:])
    if cache.dtype == FP8_DTYPE:
        rows = rows.float() if scale is None else rows.float() * scale
    return rows


# Decode groups: sequences sorted by length are split where the length falls below this fraction of
# the group's longest (little padding) or the group's padded context would exceed this many tokens
# (its gathered K/V then stays in cache for the attention that reads it right after).
_DECODE_GROUP_RATIO = 0.9
_DECODE_GROUP_TOKENS = 1024


def _decode_groups(lens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows sorted by context length, longest first, and ``[start, end)`` spans of that order whose
    lengths stay above ``_DECODE_GROUP_RATIO`` of the span's first (longest) one and whose padded
    size stays within ``_DECODE_GROUP_TOKENS`` (a longer sequence still gets a span of its own)."""
    order = sorted(range(len(lens)), key=lens.__getitem__, reverse=True)
    spans, start = [], 0
    for j in range(1, len(order)):
        longest = lens[order[start]]
        if lens[order[j]] < _DECODE_GROUP_RATIO * longest or (j + 1 - start) * longest > _DECODE_GROUP_TOKENS:
            spans.append((start, j))
            start = j
    spans.append((start, len(order)))
    return order, spans


def _attend_explicit(
    q: torch.Tensor,  # [..., m, head_dim]
    k: torch.Tensor,  # [..., t, head_dim]
    v: torch.Tensor,  # [..., t, head_dim]
    allowed: torch.Tensor,  # bool, broadcastable to [..., m, t]
    scale: float,
    logits_soft_cap: float | None,
) -> torch.Tensor:  # [..., m, head_dim] float32
    """Attention spelled out in float32, as transformers' eager attention (the windowed or capped path)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [..., m, t]
    if logits_soft_cap is not None:
        scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    scores = scores.masked_fill(~allowed, float("-inf"))  # every row keeps its own position
    return torch.matmul(torch.softmax(scores, dim=-1), v.float())


def _decode_dense(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, >= nb] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    max_seq_len: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    nb = (max_seq_len + block_size - 1) // block_size
    num_ctx = nb * block_size
    # one gather each, then views: [s, t, kvh, d] -> [s, kvh, t, d] (no copy)
    k = _gather_context(k_cache, block_tables[:, :nb], k_scale).transpose(1, 2)
    v = _gather_context(v_cache, block_tables[:, :nb], v_scale).transpose(1, 2)
    # the `group` query heads sharing a KV head act as `group` query rows of that head
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [s, kvh, g, d]
    positions = torch.arange(num_ctx, device=query.device)  # [t]
    if sliding_window is not None or logits_soft_cap is not None:
        # the query sits at position seq_len - 1: padding positions lie past it, masked as causal
        q_pos = (seq_lens.to(positions.dtype) - 1)[:, None]  # [s, 1]
        allowed = visible_keys(q_pos, positions, sliding_window)  # [s, 1, t]
        out = _attend_explicit(q, k, v, allowed[:, None], scale, logits_soft_cap)  # [s, kvh, g, d]
        return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)
    allowed = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [s, t]
    q, k, v = q.float(), k.float(), v.float()  # float32 math, as before (no-ops on float32)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :], scale=scale)  # [s, kvh, g, d]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_attention_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, the query's own included
    scale: float,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: dequantization scales (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """One query token per sequence attending to its whole cached context (GQA aware).

    Sequences are grouped by context length (see ``_decode_groups``); each group gathers its pages
    once and runs one masked SDPA, padded only to the group's longest context. A sequence with
    ``seq_len`` 0 gets zeros (as the Triton kernel does for padding rows). ``sliding_window`` and
    ``logits_soft_cap`` (see ``pageant.kernels.attention_masks``) switch to explicit float32 scores.
    An FP8 cache is read dequantized (``k_scale`` / ``v_scale``).
    """
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    options = {"sliding_window": sliding_window, "logits_soft_cap": logits_soft_cap,
               "k_scale": k_scale, "v_scale": v_scale}
    num_seqs = query.shape[0]
    if num_seqs == 0:
        return query.new_empty(query.shape)
    lens = seq_lens.tolist()
    if min(lens) <= 0:
        out = torch.zeros_like(query)
        live = [i for i, n in enumerate(lens) if n > 0]
        if live:
            rows = torch.tensor(live, device=query.device)
            out[rows] = paged_attention_decode(query[rows], k_cache, v_cache, block_tables[rows],
                                               seq_lens[rows], scale, **options)
        return out
    order, spans = _decode_groups(lens)
    if len(spans) == 1:
        return _decode_dense(query, k_cache, v_cache, block_tables, seq_lens, lens[order[0]], scale, **options)
    perm = torch.tensor(order, device=query.device)
    q, tables, sorted_lens = query.index_select(0, perm), block_tables.index_select(0, perm), seq_lens.index_select(0, perm)
    parts = [_decode_dense(q[a:b], k_cache, v_cache, tables[a:b], sorted_lens[a:b], lens[order[a]], scale, **options)
             for a, b in spans]
    return torch.empty_like(query).index_copy_(0, perm, torch.cat(parts))


def paged_attention_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths, starts at 0
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length after this step (cached + new)
    scale: float,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: dequantization scales (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Many query tokens per sequence: causal attention over cached prefix pages plus new tokens.

    With ``sliding_window`` or ``logits_soft_cap`` (see ``pageant.kernels.attention_masks``) the
    scores are explicit float32 and only the pages from the first query's window start are read.
    An FP8 cache is read dequantized (``k_scale`` / ``v_scale``), then cast to the query's dtype.
    """
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    explicit = sliding_window is not None or logits_soft_cap is not None
    num_tokens, num_heads, head_dim = query.shape
    out = torch.empty_like(query)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        nb = (seq_len + block_size - 1) // block_size
        # pages before the first query's window hold no visible key: skip them (b0 = 0 without a window)
        b0 = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1) // block_size
        pages, t = block_tables[i : i + 1, b0:nb], seq_len - b0 * block_size
        k = _gather_context(k_cache, pages, k_scale)[0, :t]  # [t, kvh, d]
        v = _gather_context(v_cache, pages, v_scale)[0, :t]
        q = query[q_start:q_end].transpose(0, 1)  # [h, q_len, d]
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [h, t, d]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        # query j sits at position seq_len - q_len + j and sees keys 0 ..= that position
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)  # [q_len]
        k_pos = torch.arange(b0 * block_size, seq_len, device=query.device)  # [t]
        if explicit:  # ... and only the last sliding_window of them
            o = _attend_explicit(q, k, v, visible_keys(q_pos, k_pos, sliding_window), scale, logits_soft_cap)
            out[q_start:q_end] = o.transpose(0, 1).to(out.dtype)  # [q_len, h, d]
            continue
        allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, t]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0).to(q.dtype), v.unsqueeze(0).to(q.dtype),
            attn_mask=allowed, scale=scale,
        )  # [1, h, q_len, d]
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden]
    """RMSNorm computed in float32, as Hugging Face Llama does, cast back to x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [num_tokens, hidden], new residual [num_tokens, hidden])
    """``residual = x + residual; return rms_norm(residual), residual``."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated (query, key), same shapes and dtypes
    """Neox-style (rotate-half) rotary embedding, as Hugging Face Llama/Mistral/Qwen apply it."""
    cos_sin = cos_sin_cache.index_select(0, positions)  # [num_tokens, rotary_dim]
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # [num_tokens, 1, rotary_dim]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x1, x2 = x32.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(query), rotate(key)
