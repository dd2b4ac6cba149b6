"""Plain PyTorch references for the quantized GEMMs of ``pageant.kernels.quant_gemm`` (the test oracle).

Every function dequantizes to float32 and multiplies in float32; results are cast to the
activation dtype (``out_dtype`` for the FP8-activation GEMMs) once, after the bias is added.
Weight layouts are the engine's in-memory ones (``engine/layers/quantization``):

- integer weights: ``qweight`` int32 ``[N, ceil(K / pack)]``, ``pack = 32 // bits`` values per
  word along K, value ``k`` at bits ``(k % pack) * bits`` of word ``k // pack`` (little-endian,
  unsigned); ``scales [N, groups]``; optional ``zeros [N, groups]`` (int8 or uint8) and
  ``g_idx [K]`` (the group of each input column; else column ``k`` is in group ``k // group_size``,
  ``group_size == -1``: one group). ``W[n, k] = (q[n, k] - zero_offset - zeros[n, g]) * scales[n, g]``
  (compressed-tensors stores ``q + 2**(bits-1)``: ``zero_offset = 2**(bits-1)``; GPTQ / AWQ: 0);
- FP8 weights: float8_e4m3fn ``[N, K]`` with per-row scales ``[N, 1]`` (a per-tensor scale is
  stored per row), or block scales ``[ceil(N / block_n), ceil(K / block_k)]``;
- dynamic FP8 activations: per token and per group of ``group_size`` columns (the last one may be
  short), ``scale = max(amax, eps) / 448`` and ``q = e4m3(clamp(x / scale, -448, 448))``
  (vLLM's ``per_token_group_quant_fp8``); per token is ``group_size = K``.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
FP8_EPS = 1e-10  # vLLM's floor on a group's amax


def unpack_int_weight(qweight: torch.Tensor, bits: int, size_k: int) -> torch.Tensor:
    """``[N, words]`` int32 -> ``[N, size_k]`` int32 unsigned values (value ``k`` of each row)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    pack = 32 // bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] * pack < size_k:
        raise ValueError(f"qweight is {qweight.dtype} {tuple(qweight.shape)}, expected int32 "
                         f"[N, {-(-size_k // pack)}] for {size_k} {bits}-bit values per row")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)  # [pack]
    values = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [N, words, pack]
    return values.flatten(-2)[:, :size_k]  # [N, size_k]


def group_index(size_k: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """``[K]`` int64: the scale column of each input column."""
    if g_idx is not None:
        if g_idx.shape != (size_k,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({size_k},)")
        return g_idx.long()
    if group_size == -1:
        return torch.zeros(size_k, dtype=torch.long, device=device)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1 (one group per channel), got {group_size}")
    return torch.arange(size_k, device=device) // group_size


def dequantize_int_weight(qweight, scales, *, bits: int, size_k: int, group_size: int = -1, zeros=None,
                          g_idx=None, zero_offset: int = 0) -> torch.Tensor:
    """The ``[N, K]`` float32 weight of an integer-quantized layer (layouts in the module docstring)."""
    q = unpack_int_weight(qweight, bits, size_k)  # [N, K]
    g = group_index(size_k, group_size, g_idx, qweight.device)  # [K]
    w = q.float() - zero_offset
    if zeros is not None:
        w = w - zeros.float()[:, g]
    return w * scales.float()[:, g]  # [N, K]


def dequant_gemm(x, qweight, scales, *, bits: int, group_size: int = -1, zeros=None, g_idx=None,
                 zero_offset: int = 0, bias=None) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)`` for an integer-quantized ``W`` -> ``[M, N]`` in x's dtype."""
    w = dequantize_int_weight(qweight, scales, bits=bits, size_k=x.shape[-1], group_size=group_size,
                              zeros=zeros, g_idx=g_idx, zero_offset=zero_offset)
    return _linear(x, w, bias, x.dtype)


def expand_block_scales(scale: torch.Tensor, block_size, shape) -> torch.Tensor:
    """``[ceil(N / bn), ceil(K / bk)]`` block scales -> ``[N, K]`` float32 (one per weight element)."""
    (bn, bk), (n, k) = block_size, shape
    if scale.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"block scales have shape {tuple(scale.shape)}, expected {(-(-n // bn), -(-k // bk))} "
                         f"for a {n} x {k} weight in {bn} x {bk} blocks")
    return scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, block_size=None) -> torch.Tensor:
    """``[N, K]`` float8_e4m3fn times per-row scales ``[N, 1]`` (or block scales) -> float32."""
    if block_size is None:
        return weight.float() * weight_scale.float().reshape(-1, 1)
    return weight.float() * expand_block_scales(weight_scale, block_size, weight.shape)


def fp8_w8a16_gemm(x, weight, weight_scale, *, block_size=None, bias=None) -> torch.Tensor:
    """Weight-only FP8: ``x @ dequantize_fp8(weight).T (+ bias)`` in x's dtype."""
    return _linear(x, dequantize_fp8(weight, weight_scale, block_size), bias, x.dtype)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, eps: float = FP8_EPS):
    """``[M, K]`` -> (``[M, K]`` float8_e4m3fn, ``[M, ceil(K / group_size)]`` float32 scales)."""
    m, k = x.shape
    groups = -(-k // group_size)
    padded = torch.zeros(m, groups * group_size, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    grouped = padded.view(m, groups, group_size)  # [M, groups, group_size]
    scale = grouped.abs().amax(-1).clamp_min(eps) / FP8_MAX  # [M, groups]
    q = (grouped / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(m, -1)[:, :k], scale


def w8a8_block_fp8_gemm(xq, x_scale, weight, weight_scale, block_size, *, out_dtype, bias=None) -> torch.Tensor:
    """FP8 activations (per-token-group scales, groups of ``block_k``) times block-FP8 weights."""
    k = xq.shape[1]
    x = xq.float() * x_scale.float().repeat_interleave(block_size[1], 1)[:, :k]  # [M, K]
    return _linear(x, dequantize_fp8(weight, weight_scale, block_size), bias, out_dtype)


def block_fp8_gemm(x, weight, weight_scale, block_size, bias=None) -> torch.Tensor:
    """Dynamic per-token-group FP8 activations, then ``w8a8_block_fp8_gemm`` (x's dtype out)."""
    xq, xs = per_token_group_quant_fp8(x, block_size[1])
    return w8a8_block_fp8_gemm(xq, xs, weight, weight_scale, block_size, out_dtype=x.dtype, bias=bias)


def fp8_scaled_mm(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """Dynamic per-token FP8 activations times per-row-scaled FP8 weights (``torch._scaled_mm``'s
    rowwise product), in x's dtype."""
    xq, xs = per_token_group_quant_fp8(x, x.shape[1])  # xs [M, 1]
    return _linear(xq.float() * xs, dequantize_fp8(weight, weight_scale), bias, x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    y = x.float() @ w.t()  # [M, N] float32
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
