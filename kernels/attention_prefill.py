"""Paged prefill/extend attention: many query tokens per sequence, causal over cached pages.

Each sequence's query tokens are its last ``q_len`` positions; its K/V (the new tokens' too) are
already in the paged cache, so one kernel serves a fresh prompt, a chunked-prefill chunk, and a
prompt whose prefix came from the prefix cache.

Work split (grid ``[num_q_blocks, num_kv_heads]``, no device sync needed to size it):

- A program takes ``BLOCK_Q`` consecutive query tokens of one sequence and *all* query heads of
  one kv head: its ``BLOCK_M = BLOCK_Q * GROUP`` (padded) rows are (token, head) pairs, so K/V
  tiles are loaded once per GQA group (as vLLM's unified attention kernel does).
- Sequence ``i`` owns q-blocks ``query_start_loc[i] // BLOCK_Q + i`` onwards; a program finds its
  sequence by binary search over ``query_start_loc``. ``num_tokens // BLOCK_Q + num_seqs`` bounds
  the q-block count; programs past their sequence's last block exit at once.
- The key loop stops at the last position any row of the block may see (causality), so a
  program's work grows with its position, never with the full padded length; tiles every row sees
  in full skip the causal and bounds masks, only the diagonal tiles apply them.

Options (compile-time flags, so the plain kernel is unchanged; semantics in ``attention_masks``):

- ``sliding_window`` ``W``: the key loop starts at the tile holding the block's first row's window
  start (tiles wholly before it are skipped, so a query costs O(W + BLOCK_Q), not O(position)). The
  leading tiles that some rows see only in part apply the window mask, then come the unmasked
  tiles, then the diagonal ones (causal and window masks). A row may see nothing in a masked tile,
  so those steps keep the running max finite (the usual ``m == -inf`` guard).
- ``logits_soft_cap`` ``c``: ``c * tanh(s / c)`` on the natural-log score ``s``, then base 2.
- FP8 cache (``FP8``): as in decode, tiles are converted to the query's dtype in registers,
  ``k_scale`` folds into the score scale and ``v_scale`` multiplies the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.attention_decode import score_scales, scaled_scores
from pageant.kernels.attention_masks import check_attention_options
from pageant.kernels.cache_ops import kv_scale_args
from pageant.kernels.triton_utils import (
    check_attention_shapes,
    check_device,
    dot,
    dot_settings,
    last_dim_contiguous,
    pow2_at_least,
)

LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence ``i`` whose first q-block ``query_start_loc[i] // BLOCK_Q + i`` <= q_block."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs  # a tensor even when num_seqs is specialised to 1
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, BLOCK_D]
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M] float32 running output, max, sum
    n0, kv_end, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
    offs_d, mask_d, qk_scale, cap_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,  # mask keys past each row's position and past kv_end
    WINDOW: tl.constexpr,  # mask keys at or before each row's position - window (CAUSAL tiles only)
    SOFT_CAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One online-softmax step over keys ``n0 .. n0 + BLOCK_N`` read through the block table."""
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    mask_n = offs_n < kv_end
    if CAUSAL:
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
    else:
        block = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
        kv_mask = (offs_n[:, None] >= 0) & mask_d[None, :]
    in_block = (offs_n % BLOCK_SIZE).to(tl.int64)
    k_ptrs = k_base + (block * stride_kb + in_block * stride_kt)[:, None] + offs_d[None, :]
    v_ptrs = v_base + (block * stride_vb + in_block * stride_vt)[:, None] + offs_d[None, :]
    if CAUSAL or HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    else:
        k = tl.load(k_ptrs).to(q.dtype)
        v = tl.load(v_ptrs).to(q.dtype)
    s = scaled_scores(dot(q, tl.trans(k), PRECISION, UPCAST), qk_scale, cap_scale, SOFT_CAP)  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    # without a window key 0 is visible to every row, so after the first step m_new is finite
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if WINDOW:  # a row that has seen no key yet: m_new is -inf, subtract 0 instead (p = alpha = 0)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["window"])
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_num_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    k_scale_ptr,  # [1] float32: an FP8 cache's dequantization scales (read with FP8 only)
    v_scale_ptr,
    qk_scale,  # scale * log2(e); scale / soft_cap with SOFT_CAP
    cap_scale,  # soft_cap * log2(e) (used with SOFT_CAP only)
    window,  # sliding window in tokens (used with SLIDING only)
    num_seqs,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q * GROUP, padded to a power of two
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per step
    SLIDING: tl.constexpr,  # each query sees only the last `window` positions
    SOFT_CAP: tl.constexpr,  # scores soft-capped with tanh
    FP8: tl.constexpr,  # the caches are float8 e4m3, holding k / k_scale and v / v_scale
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # last q-blocks first: they see the most keys, so the long programs start early (less tail)
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this block, within the seq
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # positions cached before this step's queries
    if FP8:  # q . (k_fp8 * k_scale) = (q . k_fp8) * k_scale; v_scale now, as in decode
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = first_q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    heads = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M]
    mask_m = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    if SLIDING:  # padding rows copy the block's last query, so that every row sees some key
        q_idx = tl.minimum(q_idx, tl.minimum(q_len, first_q + BLOCK_Q) - 1)
    q_pos = context_len + q_idx  # [BLOCK_M] absolute positions
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    token = (q_start + q_idx).to(tl.int64)  # [BLOCK_M] row in the flat token dimension
    q = tl.load(
        q_ptr + (token * stride_qt + heads * stride_qh)[:, None] + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # keys every row of the block sees (below its first query's position): no masks needed
    full_end = (context_len + first_q + 1) // BLOCK_N * BLOCK_N
    # the diagonal: keys up to the block's last query position (and never past the sequence)
    kv_end = tl.minimum(context_len + first_q + BLOCK_Q, seq_len)
    if SLIDING:
        # tiles before the first row's window start are skipped; those before the last row's window
        # start (but below full_end) are seen in part: window-masked, before the unmasked ones
        first_tile = tl.maximum(context_len + first_q - window + 1, 0) // BLOCK_N * BLOCK_N
        full_start = tl.minimum(tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N, full_end)
        for n0 in range(first_tile, full_start, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, acc, m_i, l_i, n0, kv_end, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
                offs_d, mask_d, qk_scale, cap_scale, window, HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N,
                True, True, SOFT_CAP, PRECISION, UPCAST,
            )
    else:
        full_start = 0
    for n0 in range(full_start, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, acc, m_i, l_i, n0, full_end, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
            offs_d, mask_d, qk_scale, cap_scale, window, HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N,
            False, False, SOFT_CAP, PRECISION, UPCAST,
        )
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, acc, m_i, l_i, n0, kv_end, q_pos, table, k_base, v_base, stride_kb, stride_kt, stride_vb, stride_vt,
            offs_d, mask_d, qk_scale, cap_scale, window, HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N,
            True, SLIDING, SOFT_CAP, PRECISION, UPCAST,
        )

    result = acc / l_i[:, None]
    if FP8:  # sum_j p_j (v_fp8_j * v_scale) = v_scale * sum_j p_j v_fp8_j
        result = result * v_scale
    dst = out_ptr + (token * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :]
    tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """``paged_attention_prefill`` with its launch knobs exposed (tests and benchmarks set them)."""
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    check_attention_shapes(query, k_cache, v_cache)
    fp8, k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError("expected query_start_loc [num_seqs + 1] and block_tables [num_seqs, max_blocks]")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    check_device(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scale, v_scale)
    query = last_dim_contiguous(query)
    block_tables, seq_lens = last_dim_contiguous(block_tables), seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()
    group = num_heads // num_kv_heads
    block_d = pow2_at_least(head_dim, 16)
    # defaults checked with compile_check on sm_90 (Triton 3.6 and 3.9): no spills, wgmma for 16-bit
    fp32 = query.dtype == torch.float32
    if block_m is None:
        block_m = 32 if fp32 else 64  # 64 rows: one warpgroup MMA tile
    block_m = pow2_at_least(group, block_m)  # at least one token's whole group per program
    block_q = block_m // group
    if block_n is None:
        block_n = 32 if fp32 or block_d > 128 else 64
    if num_warps is None:
        num_warps = 4 if block_m * block_d <= 64 * 128 and not fp32 else 8
    precision, upcast = dot_settings(query.dtype)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, k_scale, v_scale,
        *score_scales(scale, logits_soft_cap), sliding_window or 0, num_seqs,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
        SLIDING=sliding_window is not None, SOFT_CAP=logits_soft_cap is not None, FP8=fp8,
        PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
