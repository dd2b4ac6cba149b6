"""Neox-style (rotate-half) rotary embedding of query and key in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.triton_utils import check_device, last_dim_contiguous, pow2_at_least


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, token, stride_st, stride_sh, stride_dt, stride_dh,
    cos, sin,  # [1, BLOCK_HALF] float32
    offs_half,  # [BLOCK_HALF]
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[:half] = x1*cos - x2*sin; out[half:] = x2*cos + x1*sin for every head of one token."""
    for h0 in range(0, num_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        mask = (offs_h[:, None] < num_heads) & (offs_half[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
        src = src_ptr + token * stride_st + offs_h[:, None] * stride_sh + offs_half[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        o1 = a * cos + (-b) * sin
        o2 = b * cos + a * sin
        dst = dst_ptr + token * stride_dt + offs_h[:, None] * stride_dh + offs_half[None, :]
        tl.store(dst, o1.to(x1.dtype), mask=mask)
        tl.store(dst + HALF, o2.to(x2.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int64
    q_ptr, k_ptr,  # [num_tokens, num_heads | num_kv_heads, head_dim]
    q_out_ptr, k_out_ptr,  # same shapes, contiguous
    cos_sin_ptr,  # [max_position, head_dim] float32: cos | sin
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs,
    num_heads, num_kv_heads,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
    BLOCK_H: tl.constexpr,  # heads per step
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    cs_mask = offs_half < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_half, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_half, mask=cs_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh,
                  cos, sin, offs_half, num_heads, HALF, BLOCK_H)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh,
                  cos, sin, offs_half, num_kv_heads, HALF, BLOCK_H)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated (query, key), same shapes and dtypes
    """Neox-style (rotate-half) rotary embedding, as Hugging Face Llama/Mistral/Qwen apply it.

    Returns new tensors (the inputs are not modified); ``rotary_dim`` must equal ``head_dim``.
    """
    num_tokens, num_heads, head_dim = query.shape
    if key.dim() != 3 or key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected ({num_tokens},)")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or head_dim % 2:
        raise ValueError(
            f"cos_sin_cache {tuple(cos_sin_cache.shape)} must be [max_position, head_dim={head_dim}] "
            "with an even head_dim (partial rotary is not supported)"
        )
    q_out, k_out = torch.empty_like(query, memory_format=torch.contiguous_format), torch.empty_like(
        key, memory_format=torch.contiguous_format
    )
    if num_tokens == 0:
        return q_out, k_out
    check_device(positions, query, key, cos_sin_cache)
    positions = positions.contiguous()
    query, key = last_dim_contiguous(query), last_dim_contiguous(key)
    cos_sin_cache = last_dim_contiguous(cos_sin_cache)
    half = head_dim // 2
    block_half = pow2_at_least(half, 8)
    block_h = max(1, min(pow2_at_least(max(num_heads, key.shape[1]), 1), 2048 // block_half))
    _rotary_kernel[(num_tokens,)](
        positions, query, key, q_out, k_out, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        num_heads, key.shape[1],
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h,
        num_warps=4,
    )
    return q_out, k_out
