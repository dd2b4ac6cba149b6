"""Paged decode attention: one query token per sequence, K/V read through the block table.

Work split (grid ``[num_seqs, num_kv_heads, num_splits]``):

- One program serves *all* query heads of one kv head (GQA packing: the group's heads are the
  rows of a ``[BLOCK_H, head_dim]`` query tile, padded to 16 rows for ``tl.dot``), so every K/V
  byte is read from memory once per sequence, whatever the GQA ratio.
- Split-K: each sequence's context is cut into ``num_splits`` equal chunks (multiples of
  ``BLOCK_N`` tokens) handled by separate programs, which keeps the GPU busy when the batch is small
  and contexts are long. Each split writes its normalised partial output and its log-sum-exp;
  ``_decode_reduce_kernel`` combines them. With one split the first kernel writes the output.

The softmax runs online in base 2 (scores pre-multiplied by ``scale * log2(e)``) with float32
accumulators; float32 inputs use 3xTF32 dots (about fp32-exact; plain IEEE fp32 dots spill
registers on sm_90), so fp32 results match the reference to ~1e-6.

Options (compile-time flags, so the plain kernel is unchanged; semantics in ``attention_masks``):

- ``sliding_window`` ``W``: the query at position ``seq_len - 1`` sees only ``seq_len - W ..``, so
  the splits cut that window instead of the whole context (and the split count is sized by ``W``):
  pages before it are never read, a step costs the same, and no extra mask is needed.
- ``logits_soft_cap`` ``c``: ``c * tanh(s / c)`` on the natural-log score ``s``, then base 2.
- FP8 cache (``float8_e4m3fn``, ``FP8``): K/V tiles are loaded as bytes and converted to the
  query's dtype in registers; ``k_scale`` folds into the score scale and ``v_scale`` multiplies the
  output (the same math as dequantizing every element, without the per-element multiplies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.attention_masks import check_attention_options
from pageant.kernels.cache_ops import kv_scale_args
from pageant.kernels.triton_utils import (
    check_attention_shapes,
    check_device,
    device_sms,
    dot,
    dot_settings,
    last_dim_contiguous,
    pow2_at_least,
)

LOG2E = 1.4426950408889634
MAX_SPLITS = 32


@triton.jit
def tanh(x):
    """tanh from one exp of a non-positive number (no overflow; tl has no tanh on every version)."""
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def scaled_scores(qk, qk_scale, cap_scale, SOFT_CAP: tl.constexpr):
    """Base-2 scores from raw dot products: ``qk * qk_scale``, or with a soft cap ``c``
    (``qk_scale = scale / c``, ``cap_scale = c * log2(e)``) ``c * tanh(qk * scale / c) * log2(e)``."""
    if SOFT_CAP:
        return tanh(qk * qk_scale) * cap_scale
    else:
        return qk * qk_scale


def score_scales(scale: float, logits_soft_cap: float | None) -> tuple[float, float]:
    """``(qk_scale, cap_scale)`` for ``scaled_scores``."""
    if logits_soft_cap is None:
        return float(scale) * LOG2E, 0.0
    return float(scale) / logits_soft_cap, logits_soft_cap * LOG2E


@triton.jit(do_not_specialize=["num_splits", "window"])
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim] (written when not SPLIT_K)
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32 (written when SPLIT_K)
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] float32, base-2 log-sum-exp
    k_scale_ptr,  # [1] float32: an FP8 cache's dequantization scales (read with FP8 only)
    v_scale_ptr,
    qk_scale,  # scale * log2(e); scale / soft_cap with SOFT_CAP
    cap_scale,  # soft_cap * log2(e) (used with SOFT_CAP only)
    window,  # sliding window in tokens (used with SLIDING only)
    num_splits,  # a run-time value, so batch sizes do not each compile a new kernel
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_os, stride_oh,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_H: tl.constexpr,  # GROUP rounded up to a power of two >= 16
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    BLOCK_N: tl.constexpr,  # context tokens per step
    SPLIT_K: tl.constexpr,  # num_splits > 1: write partial results for the reduce kernel
    SLIDING: tl.constexpr,  # only the last `window` positions are visible
    SOFT_CAP: tl.constexpr,  # scores soft-capped with tanh
    FP8: tl.constexpr,  # the caches are float8 e4m3, holding k / k_scale and v / v_scale
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if FP8:  # q . (k_fp8 * k_scale) = (q . k_fp8) * k_scale; v_scale now (its live pointer spilled on sm_90)
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    seq_len = tl.load(seq_lens_ptr + seq)
    if SLIDING:  # the query (position seq_len - 1) sees seq_len - window .. seq_len - 1
        lo = tl.maximum(seq_len - window, 0)
    else:
        lo = 0
    # equal chunks of whole BLOCK_N steps; trailing splits of a short sequence may be empty
    split_len = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h  # [BLOCK_H]
    mask_h = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :], other=0.0,
    )  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        mask_n = offs_n < end
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        in_block = (offs_n % BLOCK_SIZE).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_cache_ptr + (block * stride_kb + in_block * stride_kt + kv_head * stride_kh)[:, None] + offs_d[None, :],
            mask=kv_mask, other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_cache_ptr + (block * stride_vb + in_block * stride_vt + kv_head * stride_vh)[:, None] + offs_d[None, :],
            mask=kv_mask, other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        s = scaled_scores(dot(q, tl.trans(k), PRECISION, UPCAST), qk_scale, cap_scale, SOFT_CAP)  # [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: each step has a valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_H, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split has l_i == 0 and acc == 0
    result = acc / l_safe[:, None]  # [BLOCK_H, BLOCK_D]
    if FP8:  # sum_j p_j (v_fp8_j * v_scale) = v_scale * sum_j p_j v_fp8_j
        result = result * v_scale
    out_mask = mask_h[:, None] & mask_d[None, :]
    if not SPLIT_K:
        dst = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], result, mask=out_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=mask_h)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] float32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] float32
    out_ptr,  # [num_seqs, num_heads, head_dim]
    stride_os, stride_oh,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
):
    """Combine the splits of one (sequence, head): weights 2^(lse_s - max lse)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * num_heads + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=mask_s, other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no token at all: output zeros
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]; 0 for empty splits
    parts = tl.load(
        part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :], other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, axis=0)
    total = tl.where(total > 0.0, total, 1.0)
    result = tl.sum(parts * w[:, None], axis=0) / total  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty), mask=mask_d)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Splits per sequence so that about two programs per SM exist, each with >= 2 steps of work.

    ``max_context`` is an upper bound known without a device sync (the block table's width times
    the block size), so the choice never reads ``seq_lens`` on the host.
    """
    programs = num_seqs * num_kv_heads
    want = triton.cdiv(2 * num_sms, max(programs, 1))
    most = max(1, max_context // (2 * block_n))
    return int(max(1, min(want, most, MAX_SPLITS)))


def decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``paged_attention_decode`` with its launch knobs exposed (tests and benchmarks set them)."""
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_attention_shapes(query, k_cache, v_cache)
    fp8, k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError("block_tables must be [num_seqs, max_blocks] and seq_lens [num_seqs]")
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    check_device(query, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    query = last_dim_contiguous(query)
    block_tables, seq_lens = last_dim_contiguous(block_tables), seq_lens.contiguous()
    group = num_heads // num_kv_heads
    block_d = pow2_at_least(head_dim, 16)
    block_h = pow2_at_least(group, 16)
    if block_n is None:  # fp32 tiles are twice the bytes and its 3xTF32 dots need more registers
        block_n = 64 if block_d <= 128 and query.dtype != torch.float32 else 32
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        if sliding_window is not None:  # the splits cut only the window
            max_context = min(max_context, sliding_window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, block_n, device_sms(query.device))
    precision, upcast = dot_settings(query.dtype)
    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, k_scale, v_scale,
        *score_scales(scale, logits_soft_cap), sliding_window or 0, num_splits,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n, SPLIT_K=num_splits > 1,
        SLIDING=sliding_window is not None, SOFT_CAP=logits_soft_cap is not None, FP8=fp8,
        PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_S=pow2_at_least(num_splits, 2), num_warps=4,
        )
    return out
