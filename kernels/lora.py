"""Triton kernels for batched multi-LoRA: shrink (x @ A.T) and expand (y @ B.T, accumulated).

Same signatures as ``pageant.kernels.lora_reference`` (see its docstring for the batch layout).
Launch grid: ``(token tiles * output tiles, max_loras)`` (shrink: ``(tiles, split_k, max_loras)``,
its K loop split across programs). Program ``(t, s)`` takes the tokens of adapter slot ``s`` (from ``LoRAKernelMeta``: tokens grouped by slot once per batch), tile ``t``
of them and of the output columns; programs of empty slots or past the slot's token count exit at
once, so the grid needs no host-side knowledge of the batch (no sync, CUDA-graph friendly).
Accumulation is float32. On the CPU, set ``TRITON_INTERPRET=1`` before importing this module.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pageant.kernels.lora_reference import (
    LoRAKernelMeta,
    _check_expand_shapes,
    _check_shrink_shapes,
    _meta,
    sliced_ops,
)

__all__ = ["LoRAKernelMeta", "lora_shrink", "lora_expand", "lora_shrink_sliced", "lora_expand_sliced"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device; got {device} and {t.device}")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton LoRA kernels need CUDA tensors (got {device}); on the CPU use "
            "pageant.kernels.lora_reference, or set TRITON_INTERPRET=1 before importing this module"
        )


def _dot_flags(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast): fp32 uses exact "ieee"; bf16 is widened in the interpreter,
    whose ``tl.dot`` multiplies bf16's raw uint16 storage."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (dtype == torch.bfloat16 and _interpreting())


def _block(n: int, floor: int = 16, cap: int = 64) -> int:
    return min(cap, max(floor, triton.next_power_of_2(max(int(n), 1))))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(num_programs: int, num_k_chunks: int, device: torch.device) -> int:
    """How many programs share one shrink tile's K (in_features) loop.

    Shrink's output is tiny (tokens x rank) while K is the model width, so a decode batch gives
    only a handful of tiles: splitting K (partial sums atomically added, as vLLM's shrink does)
    fills the GPU. Aims at about two programs per SM; 1 (no atomics) when tiles suffice.
    """
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4  # the interpreter: still exercise the split path on wide inputs
    return max(1, min(num_k_chunks, (2 * sms) // max(num_programs, 1)))


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, sorted_ptr, counts_ptr, starts_ptr,
    N, K, scale,
    stride_xm, stride_xk, stride_as, stride_an, stride_ak, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # split-K: this program sums K chunks pid_k, pid_k + SPLIT_K, ...
    slot = tl.program_id(2)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    count = tl.load(counts_ptr + slot + 1)  # entry 0 counts base-model tokens
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions in the slot's tokens
    mask_m = offs_m < count
    rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)  # token ids
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rank columns
    mask_n = offs_n < N
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        a = tl.load(
            a_base + offs_n[None, :] * stride_an + offs_k[:, None] * stride_ak,
            mask=mask_n[None, :] & mask_k[:, None], other=0.0,
        )  # [BLOCK_K, BLOCK_N] = A[slot].T tile
        a = a.to(x.dtype)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, a, input_precision=PRECISION)
    acc = acc * scale
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:  # partial sums of the K chunks meet in the zero-initialised float32 output
        tl.atomic_add(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_expand_kernel(
    y_ptr, b_ptr, out_ptr, sorted_ptr, counts_ptr, starts_ptr,
    N, K, col_offset,
    stride_ym, stride_yk, stride_bs, stride_bn, stride_bk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ADD_INPUTS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    count = tl.load(counts_ptr + slot + 1)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    mask_n = offs_n < N
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K = rank: usually a single iteration
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        b = tl.load(
            b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
            mask=mask_n[None, :] & mask_k[:, None], other=0.0,
        )  # [BLOCK_K, BLOCK_N] = B[slot].T tile
        y = tl.load(
            y_ptr + rows[:, None] * stride_ym + offs_k[None, :] * stride_yk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        ).to(b.dtype)  # [BLOCK_M, BLOCK_K], cast to the weights' dtype as vLLM does
        if UPCAST:
            acc += tl.dot(y.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(y, b, input_precision=PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + (col_offset + offs_n[None, :]) * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ADD_INPUTS:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a_stacked: torch.Tensor,  # [max_loras, rank, in_features]
    token_lora_indices: torch.Tensor,  # [num_tokens] int, -1 = no LoRA
    scale: float = 1.0,
    *,
    meta: LoRAKernelMeta | None = None,
) -> torch.Tensor:  # [num_tokens, rank] float32; rows of base-model tokens are zero
    """``out[t] = scale * x[t] @ lora_a_stacked[slot[t]].T`` for tokens with an adapter."""
    max_loras, rank, in_features = lora_a_stacked.shape
    _check_shrink_shapes(x, lora_a_stacked)
    _check(x, lora_a_stacked, token_lora_indices)
    meta = _meta(meta, token_lora_indices, max_loras)
    num_tokens = x.shape[0]
    out = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or max_loras == 0:
        return out
    block_m, block_n, block_k = _block(num_tokens), _block(rank), _block(in_features, cap=128)
    precision, upcast = _dot_flags(x.dtype)
    tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(rank, block_n)
    split_k = _split_k(tiles * max_loras, triton.cdiv(in_features, block_k), x.device)
    grid = (tiles, split_k, max_loras)
    _lora_shrink_kernel[grid](
        x, lora_a_stacked, out, meta.sorted_token_indices, meta.num_tokens_per_slot, meta.slot_start,
        rank, in_features, float(scale),
        x.stride(0), x.stride(1), *lora_a_stacked.stride(), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, PRECISION=precision, UPCAST=upcast,
    )
    return out


def lora_expand(
    y: torch.Tensor,  # [num_tokens, rank]
    lora_b_stacked: torch.Tensor,  # [max_loras, out_features, rank]
    token_lora_indices: torch.Tensor,  # [num_tokens] int, -1 = no LoRA
    out: torch.Tensor,  # [num_tokens, >= offset + out_features], written in place
    add_inputs: bool = True,
    *,
    offset: int = 0,
    meta: LoRAKernelMeta | None = None,
) -> torch.Tensor:  # out
    """``out[t, offset:offset+out_features] (+)= y[t] @ lora_b_stacked[slot[t]].T``."""
    max_loras, out_features, rank = lora_b_stacked.shape
    _check_expand_shapes(y, lora_b_stacked, out, offset)
    _check(y, lora_b_stacked, token_lora_indices, out)
    meta = _meta(meta, token_lora_indices, max_loras)
    num_tokens = y.shape[0]
    if num_tokens == 0 or max_loras == 0:
        return out
    block_m, block_n, block_k = _block(num_tokens), _block(out_features, cap=128), _block(rank)
    precision, upcast = _dot_flags(lora_b_stacked.dtype)
    grid = (triton.cdiv(num_tokens, block_m) * triton.cdiv(out_features, block_n), max_loras)
    _lora_expand_kernel[grid](
        y, lora_b_stacked, out, meta.sorted_token_indices, meta.num_tokens_per_slot, meta.slot_start,
        out_features, rank, offset,
        y.stride(0), y.stride(1), *lora_b_stacked.stride(), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ADD_INPUTS=add_inputs,
        PRECISION=precision, UPCAST=upcast,
    )
    return out


lora_shrink_sliced, lora_expand_sliced = sliced_ops(lora_shrink, lora_expand)
