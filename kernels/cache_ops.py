"""KV-cache write: scatter each new token's key and value into its slot of the paged cache.

An FP8 (``float8_e4m3fn``) cache gets ``x / scale`` (IEEE division), clamped to +-448 and rounded
to the nearest e4m3 value, ties to even, as ``reference.quantize_fp8`` does; the rounding is done
in float32 (``round_to_e4m3``), so the final cast is exact on a GPU (``cvt.rn.satfinite``) and in
Triton's interpreter, whose own float8 cast rounds ties away and carries mantissa overflow wrongly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.reference import FP8_DTYPE, FP8_MAX
from pageant.kernels.triton_utils import check_device, last_dim_contiguous, pow2_at_least

FP8_E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def round_to_e4m3(x):
    """float32 ``x`` (``|x| <= 448``) rounded to the nearest float8 e4m3 value, ties to even, as float32."""
    # normal range (|x| >= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even on the bits
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # subnormal range: multiples of 2^-9; float32 addition at 2^14 (whose ulp is 2^-9) rounds to even
    small = (tl.abs(x) + 16384.0) - 16384.0
    small = tl.where(bits < 0, -small, small)  # the sign bit's sign (-0.0 stays -0.0, as torch's cast)
    return tl.where(tl.abs(x) < 0.015625, small, normal)


@triton.jit
def quantize_e4m3(x, scale):
    """``x / scale`` (float32, IEEE division) clamped to +-448 and rounded to e4m3 (still float32)."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    return round_to_e4m3(tl.minimum(tl.maximum(y, -FP8_E4M3_MAX), FP8_E4M3_MAX))


def kv_scale_args(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,  # [] or [1] float32
    v_scale: torch.Tensor | None,
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """``(fp8, k_scale, v_scale)`` as the kernels take them: with an FP8 cache the scales (1.0 when
    None) as one-element float32 tensors on the cache's device; otherwise the caches stand in for
    the pointers, which the kernels then never read."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) differ in dtype")
    if k_cache.dtype != FP8_DTYPE:
        return False, k_cache, v_cache
    scales = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            scale = torch.ones((), dtype=torch.float32, device=k_cache.device)
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != k_cache.device:
            raise ValueError(f"{name} must be a one-element float32 tensor on {k_cache.device}, got "
                             f"{scale.dtype} {tuple(scale.shape)} on {scale.device}")
        scales.append(scale)
    return True, scales[0], scales[1]


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    k_scale_ptr,  # [1] float32 (read with FP8 only)
    v_scale_ptr,
    stride_key_t, stride_key_h,
    stride_value_t, stride_value_h,
    stride_kc_b, stride_kc_t, stride_kc_h,
    stride_vc_b, stride_vc_t, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_H: tl.constexpr,  # kv heads per program, a power of two
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
    FP8: tl.constexpr,  # the caches are float8 e4m3: store x / scale, quantized
):
    """One program per (token, group of BLOCK_H kv heads); a negative slot writes nothing."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
    k = tl.load(key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + block * stride_kc_b + offset * stride_kc_t + offs_h[:, None] * stride_kc_h + offs_d[None, :]
    vc = v_cache_ptr + block * stride_vc_b + offset * stride_vc_t + offs_h[:, None] * stride_vc_h + offs_d[None, :]
    if FP8:
        k = quantize_e4m3(k, tl.load(k_scale_ptr))
        v = quantize_e4m3(v, tl.load(v_scale_ptr))
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    if k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not hold "
            f"[*, *, {num_kv_heads}, {head_dim}] tokens"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping has shape {tuple(slot_mapping.shape)}, expected ({num_tokens},)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head_dim must be contiguous (they are written in place)")
    fp8, k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    check_device(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    slot_mapping = slot_mapping.contiguous()
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    block_d = pow2_at_least(head_dim, 16)
    # about 1024 elements per program: all kv heads of a token for common shapes
    block_h = min(pow2_at_least(num_kv_heads, 1), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _reshape_and_cache_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        FP8=fp8,
        num_warps=4,
    )
