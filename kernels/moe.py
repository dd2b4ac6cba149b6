"""Fused Mixture-of-Experts (Mixtral-style) on Triton: a grouped GEMM over expert-sorted pairs.

Same signatures and weight layout as ``pageant.kernels.moe_reference`` (see its docstring). The
work, in the style of vLLM's ``fused_moe``:

1. ``moe_align_block_size`` (PyTorch ops, no host sync): the ``num_pairs = num_tokens * top_k``
   (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of
   ``BLOCK_M``, so every ``BLOCK_M`` block of the sorted list belongs to one expert. Buffers have
   their worst-case size (a function of shapes only), the real padded length stays on the device.
2. ``_moe_gemm_kernel`` launch 1: for each block and ``BLOCK_N`` tile of ``2 * intermediate``,
   ``x[token(pair)] @ w13[expert].T`` -> ``inter [num_pairs, 2 * intermediate]``.
3. ``_moe_gemm_kernel`` launch 2: its A tiles are ``act(gate) * up`` computed on the fly from
   ``inter`` (float32, then the compute dtype), times ``w2[expert].T``, times the pair's routing
   weight -> ``out_pairs [num_pairs, hidden]``.
4. ``out_pairs.view(num_tokens, top_k, hidden).sum(1)``.

Programs whose block lies past the padded length exit at once, so the grid is sized from shapes
alone (CUDA-graph capturable). Expert ids outside ``[0, num_experts)`` are not checked (that
would read device data): such pairs are dropped and contribute zero. Dots accumulate in float32
(``dot_settings``: 3xTF32 for float32). ``select_experts`` is the PyTorch one (a softmax and a topk
on ``[num_tokens, num_experts]``: cheap, and the same on every device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.moe_reference import check_moe_shapes, select_experts
from pageant.kernels.triton_utils import check_device, dot, dot_settings, pow2_at_least

__all__ = ["fused_moe", "select_experts", "moe_align_block_size"]

_ACT_IDS = {"silu": 1, "gelu": 2}  # ACT constexpr of the kernel; 0 = plain A tiles


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64
    block_m: int,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of ``block_m``; no host sync.

    Returns ``sorted_pair_ids [num_blocks * block_m]`` int32 (pair ``p = token * top_k + slot``;
    ``num_pairs`` marks padding), ``block_expert_ids [num_blocks]`` int32 (the expert of each block;
    ``num_experts`` past the end) and ``num_padded [1]`` int32 (the padded length actually used).
    ``num_blocks`` is the worst case ``cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m)``.
    Pairs whose id is outside ``[0, num_experts)`` are left out.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [num_pairs]
    num_pairs = flat.numel()
    max_padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    num_blocks = triton.cdiv(max_padded, block_m)
    capacity = num_blocks * block_m
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, num_experts)  # [num_pairs]; bucket num_experts = dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # [num_experts + 1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [num_experts]
    padded_ends = torch.cumsum(padded, 0)  # [num_experts]
    dump = torch.full((1,), capacity, dtype=torch.int64, device=device)  # where dropped pairs go
    padded_starts = torch.cat([padded_ends - padded, dump])  # [num_experts + 1]
    starts = torch.cumsum(counts, 0) - counts  # [num_experts + 1] unpadded run starts
    sorted_bucket, order = torch.sort(bucket, stable=True)  # [num_pairs] each
    rank = torch.arange(num_pairs, device=device) - starts[sorted_bucket]  # position in its run
    dest = padded_starts[sorted_bucket] + torch.where(sorted_bucket < num_experts, rank, 0)
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m  # [num_blocks]
    block_expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    num_padded = padded_ends[-1:].to(torch.int32)  # [1]
    return sorted_pair_ids[:capacity], block_expert_ids, num_padded


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # launch 1: hidden_states [num_tokens, K]; launch 2: inter [num_pairs, 2 * K]
    b_ptr,  # [num_experts, N, K]: w13 (N = 2 * intermediate) or w2 (N = hidden)
    c_ptr,  # [num_pairs, N]
    weights_ptr,  # [num_pairs] routing weights (read when MUL_WEIGHT)
    sorted_ids_ptr,  # [num_blocks * BLOCK_M] int32 pair ids, num_pairs = padding
    block_expert_ids_ptr,  # [num_blocks] int32
    num_padded_ptr,  # [1] int32
    num_pairs, N, K,
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,  # A's row of pair p is p // A_ROW_DIV (top_k for launch 1, 1 for 2)
    ACT: tl.constexpr,  # 0: A as is; 1 silu / 2 gelu-tanh: A = act(a[:, :K]) * a[:, K:2K]
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)  # [BLOCK_M]
    mask_m = pairs < num_pairs
    pairs = tl.where(mask_m, pairs, 0).to(tl.int64)
    a_rows = a_ptr + (pairs // A_ROW_DIV)[:, None] * stride_am  # [BLOCK_M, 1]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_n = offs_n < N
    b_cols = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a_mask = mask_m[:, None] & mask_k[None, :]
        if ACT == 0:
            a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
        else:
            gate = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            up = tl.load(a_rows + (K + offs_k)[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
            if ACT == 1:
                gate = gate * tl.sigmoid(gate)
            else:
                gate = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
            a = (gate * up).to(b.dtype)  # [BLOCK_M, BLOCK_K]
        acc += dot(a, b, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)  # [BLOCK_M]
        acc = acc * w[:, None]
    dst = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(dst, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_sizes(num_pairs: int, num_experts: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) from shapes only, after vLLM's default configs: 16 x 32 x 64 while
    experts get few pairs (decode), 64 x 64 x 64 otherwise; float32's 3xTF32 dots get 32-wide tiles.
    Compiled for sm_90 (Mixtral-8x7B shapes) these spill no registers (16 x 64 tiles did, with the
    activation fused into the second launch)."""
    block_m = 16 if num_pairs <= 16 * num_experts else 64
    wide = dtype != torch.float32
    block_n = min(64 if wide and block_m > 16 else 32, pow2_at_least(n, 16))
    block_k = min(64 if wide else 32, pow2_at_least(k, 16))
    return block_m, block_n, block_k


def _launch(a, b, c, weights, align, num_pairs, a_row_div, act, mul_weight, k, blocks, dtype):
    sorted_ids, block_experts, num_padded = align
    block_m, block_n, block_k = blocks
    n = b.shape[1]
    precision, upcast = dot_settings(dtype)
    grid = (block_experts.shape[0] * triton.cdiv(n, block_n),)
    _moe_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_experts, num_padded,
        num_pairs, n, k,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, ACT=act, MUL_WEIGHT=mul_weight,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=precision, UPCAST=upcast,
    )


def fused_moe(
    hidden_states: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * intermediate, hidden]: gate rows then up rows
    w2: torch.Tensor,  # [num_experts, hidden, intermediate]
    topk_weights: torch.Tensor,  # [num_tokens, top_k] (float32 from select_experts)
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64, values in [0, num_experts)
    activation: str = "silu",
) -> torch.Tensor:  # [num_tokens, hidden], hidden_states' dtype
    """The experts' gated MLPs for each token's ``top_k`` experts, weighted and summed (two grouped
    GEMM launches over expert-sorted pairs; see the module docstring). No host sync."""
    check_moe_shapes(hidden_states, w13, w2, topk_weights, topk_ids, activation)
    check_device(hidden_states, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    num_pairs = num_tokens * top_k
    dtype = hidden_states.dtype
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    weights = topk_weights.reshape(-1)  # [num_pairs]
    # one alignment for both launches: BLOCK_M depends on num_pairs and num_experts only
    blocks1 = _block_sizes(num_pairs, num_experts, 2 * intermediate, hidden, dtype)
    blocks2 = _block_sizes(num_pairs, num_experts, hidden, intermediate, dtype)
    align = moe_align_block_size(topk_ids, blocks1[0], num_experts)
    inter = torch.empty(num_pairs, 2 * intermediate, dtype=dtype, device=hidden_states.device)
    _launch(hidden_states, w13, inter, weights, align, num_pairs, top_k, 0, False, hidden, blocks1, dtype)
    # zeros: pairs with an out-of-range expert id are never written and must add nothing
    out_pairs = torch.zeros(num_pairs, hidden, dtype=dtype, device=hidden_states.device)
    _launch(inter, w2, out_pairs, weights, align, num_pairs, 1, _ACT_IDS[activation], True, intermediate,
            blocks2, dtype)
    return out_pairs.view(num_tokens, top_k, hidden).sum(dim=1)  # [num_tokens, hidden]
