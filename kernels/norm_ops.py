"""RMSNorm and the fused residual-add + RMSNorm, one program per token row.

Rounding follows the reference (and Hugging Face Llama) step by step: the residual sum is rounded
to its dtype before it is normalised, the normalised row is rounded to the input dtype before the
weight multiplies it, so bf16/fp16 results match the reference bit for bit in most elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.triton_utils import check_device, last_dim_contiguous, pow2_at_least


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (read only when HAS_RESIDUAL)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]
    residual_out_ptr,  # [num_tokens, hidden] (written only when HAS_RESIDUAL)
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # hidden rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # the sum is rounded to the residual's dtype, as ``x + residual`` in PyTorch is
        s = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, s, mask=mask)
        x = s
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(x.dtype)  # rounded to the input dtype first
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def _rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, hidden] (any leading dims, as the reference accepts), last dim contiguous."""
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"expected x [..., hidden] and weight [hidden]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    return last_dim_contiguous(x.reshape(-1, x.shape[-1]))


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [num_tokens, hidden]
    """RMSNorm computed in float32, as Hugging Face Llama does, cast back to x's dtype."""
    rows = _rows(x, weight)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows.shape[0] == 0:
        return out
    check_device(x, weight)
    weight = weight.contiguous()
    out_rows = out.view(-1, x.shape[-1])
    block = pow2_at_least(rows.shape[1], 16)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows, weight, out_rows, out_rows,
        rows.stride(0), rows.stride(0), out_rows.stride(0), out_rows.stride(0),
        rows.shape[1], float(eps),
        HAS_RESIDUAL=False, BLOCK=block, num_warps=_num_warps(block),
    )
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [num_tokens, hidden], new residual [num_tokens, hidden])
    """``residual = x + residual; return rms_norm(residual), residual`` in one pass over memory.

    Returns new tensors; ``x`` and ``residual`` are not modified.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
    rows, res_rows = _rows(x, weight), _rows(residual, weight)
    sum_dtype = torch.result_type(x, residual)
    new_residual = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    if rows.shape[0] == 0:
        return out, new_residual
    check_device(x, residual, weight)
    weight = weight.contiguous()
    out_rows, new_res_rows = out.view(-1, x.shape[-1]), new_residual.view(-1, x.shape[-1])
    block = pow2_at_least(rows.shape[1], 16)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, out_rows, new_res_rows,
        rows.stride(0), res_rows.stride(0), out_rows.stride(0), new_res_rows.stride(0),
        rows.shape[1], float(eps),
        HAS_RESIDUAL=True, BLOCK=block, num_warps=_num_warps(block),
    )
    return out, new_residual
