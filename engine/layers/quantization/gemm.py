"""The quantized GEMMs the quant methods' ``apply`` call: Triton kernels on CUDA, dequantize-then-
``F.linear`` elsewhere (the CPU path, bit-identical to what the methods did before these existed).

- ``int_weight_gemm``: W4A16 / W8A16 (compressed-tensors ``pack-quantized``, GPTQ, AWQ) on
  ``pageant.kernels.quant_gemm.dequant_gemm``. GPTQ's ``g_idx``: when it is the plain
  ``k // group_size`` (``desc_act`` false), found once per tensor (one host sync, never during CUDA
  graph capture) and cached on it, the kernel reads contiguous groups; an act-order ``g_idx`` is
  gathered per element in the kernel (no load-time permutation).
- ``fp8_gemm``: FP8 E4M3 weights with per-row scales. Weight-only (``dynamic_per_token=False``):
  the e4m3 bytes upcast in registers (``fp8_w8a16_gemm``). ``dynamic_per_token=True`` (W8A8, FP8
  dynamic schemes) on sm_89+ (Ada, Hopper) with K and N multiples of 16: activations quantized
  per token and ``torch._scaled_mm`` (vLLM's ``Fp8LinearMethod``); on older GPUs weight-only, as
  vLLM falls back to its weight-only Marlin kernel.
- ``block_fp8_gemm``: FP8 weights with ``[ceil(N / bn), ceil(K / bk)]`` block scales
  (``weight_block_size``, DeepSeek-V3 / Qwen3-FP8). ``dynamic_per_group=True`` on sm_89+:
  activations quantized per token and ``bk`` group, ``w8a8_block_fp8_matmul``; otherwise
  weight-only ``fp8_w8a16_gemm`` with block scales.

On the CPU the dynamic variants fake-quantize the activations with vLLM's arithmetic
(``quant_gemm_reference.per_token_group_quant_fp8``) before the dequantized ``F.linear``.
Inputs are ``[..., K]``; the kernels flatten the leading dims. Anything the kernels do not take
(another activation dtype, K not a multiple of 4 for FP8) runs the CPU path's ops on the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _KERNEL_DTYPES


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_matmul_supported(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 8.9 or newer (FP8 tensor cores: Ada, Hopper)."""
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


def unpack_int_weight(qweight: torch.Tensor, bits: int, size_k: int) -> torch.Tensor:
    """``[N, words]`` int32 -> ``[N, size_k]`` uint8: value ``k`` at bits ``(k % (32 / bits)) * bits`` of
    word ``k // (32 / bits)`` (the layout compressed-tensors, GPTQ and AWQ are kept in)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    values = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [N, words, 32 / bits]
    return values.flatten(-2)[:, :size_k].to(torch.uint8)


def dequantize_int_weight(qweight, scales, *, bits: int, size_k: int, group_size: int, zeros=None, g_idx=None,
                          zero_offset: int = 0, dtype: torch.dtype) -> torch.Tensor:
    """The ``[N, K]`` weight in ``dtype``: ``(q - zero_offset - zeros) * scales`` per group, computed in
    the scales' dtype (the integers are exact there, the product rounds once), then cast."""
    q = (unpack_int_weight(qweight, bits, size_k).to(torch.int16) - zero_offset).to(scales.dtype)  # [N, K]
    if g_idx is not None:
        g = g_idx.long()
        w = q - zeros.to(scales.dtype)[:, g] if zeros is not None else q
        return (w * scales[:, g]).to(dtype)
    out = q.shape[0]
    q = q.view(out, scales.shape[1], -1)  # [N, groups, group size]
    if zeros is not None:
        q = q - zeros.to(scales.dtype).unsqueeze(-1)
    return (q * scales.unsqueeze(-1)).view(out, size_k).to(dtype)


def _contiguous_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether ``g_idx`` is ``arange(K) // group_size`` (cached on the tensor, keyed by its version)."""
    cached = getattr(g_idx, "_pageant_contiguous", None)
    if cached is not None and cached[0] == (g_idx._version, group_size):
        return cached[1]
    if g_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # no host sync inside a capture: the gather path is right for any g_idx
    groups = torch.arange(g_idx.numel(), device=g_idx.device)
    plain = torch.equal(g_idx.long(), groups // group_size if group_size > 0 else groups * 0)
    g_idx._pageant_contiguous = ((g_idx._version, group_size), plain)
    return plain


def int_weight_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                    zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None, zero_offset: int = 0,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` for packed integer weights ``qweight [N, ceil(K * bits / 32)]``,
    ``scales [N, groups]``, optional ``zeros [N, groups]`` (int8 / uint8) and ``g_idx [K]``;
    ``W = (q - zero_offset - zeros) * scales``; ``group_size`` -1: one group per channel."""
    k = x.shape[-1]
    if _on_gpu(x):
        from pageant.kernels.quant_gemm import dequant_gemm

        if g_idx is not None and _contiguous_g_idx(g_idx, group_size):
            g_idx = None
        return dequant_gemm(x, qweight, scales, bits=bits, group_size=group_size, zeros=zeros, g_idx=g_idx,
                            zero_offset=zero_offset, bias=bias)
    weight = dequantize_int_weight(qweight, scales, bits=bits, size_k=k, group_size=group_size, zeros=zeros,
                                   g_idx=g_idx, zero_offset=zero_offset, dtype=x.dtype)
    return F.linear(x, weight, bias)


def handles_fp8_input(input_args, x: torch.Tensor) -> bool:
    """Whether ``fp8_gemm`` computes a compressed-tensors FP8 scheme with these ``input_activations``
    args: weight-only (None) everywhere; symmetric dynamic per-token FP8 on CUDA (the CPU keeps
    the scheme's own fake-quantization, Hugging Face's arithmetic)."""
    if input_args is None:
        return True
    return (x.is_cuda and input_args.dynamic and input_args.type == "float" and input_args.strategy == "token"
            and input_args.symmetric)


def _fake_quant(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x [..., K]`` through vLLM's dynamic FP8 quantization and back, in x's dtype."""
    from pageant.kernels.quant_gemm_reference import per_token_group_quant_fp8

    x2 = x.reshape(-1, x.shape[-1])
    q, s = per_token_group_quant_fp8(x2, group_size)
    deq = q.float() * s.repeat_interleave(group_size, 1)[:, :x2.shape[1]]
    return deq.to(x.dtype).reshape(x.shape)


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
             dynamic_per_token: bool = False) -> torch.Tensor:
    """``x [..., K] @ (weight * weight_scale).T (+ bias)`` for float8_e4m3fn ``weight [N, K]`` and
    per-row ``weight_scale [N, 1]``; ``dynamic_per_token``: activations quantized to FP8 per token
    (see the module docstring for which kernel runs where)."""
    n, k = weight.shape
    if _on_gpu(x):
        from pageant.kernels import quant_gemm

        if dynamic_per_token and fp8_matmul_supported(x.device) and k % 16 == 0 and n % 16 == 0:
            return quant_gemm.fp8_scaled_mm(x, weight, weight_scale, bias)
        if k % 4 == 0:
            return quant_gemm.fp8_w8a16_gemm(x, weight, weight_scale, bias=bias)
    if dynamic_per_token and not x.is_cuda:
        x = _fake_quant(x, k)
    scale = weight_scale
    return F.linear(x, (weight.to(scale.dtype) * scale).to(x.dtype), bias)


def block_fp8_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block_size,
                   bias: torch.Tensor | None = None, *, dynamic_per_group: bool = False) -> torch.Tensor:
    """``x [..., K] @ dequant(weight).T (+ bias)`` for float8_e4m3fn ``weight [N, K]`` with block scales
    ``weight_scale [ceil(N / bn), ceil(K / bk)]``, ``block_size = (bn, bk)``; ``dynamic_per_group``:
    activations quantized to FP8 per token and ``bk`` group. The weight-only CPU path is
    ``fp8_block.py``'s dequantization (in the scales' dtype), then ``F.linear``."""
    bn, bk = (int(v) for v in block_size)
    n, k = weight.shape
    if weight_scale.shape != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"block FP8 weight_scale has shape {tuple(weight_scale.shape)}, expected "
                         f"{(-(-n // bn), -(-k // bk))} for a {n} x {k} weight in {bn} x {bk} blocks")
    if _on_gpu(x):
        from pageant.kernels import quant_gemm

        if dynamic_per_group and fp8_matmul_supported(x.device) and bk in (16, 32, 64, 128):
            xq, xs = quant_gemm.per_token_group_quant_fp8(x.reshape(-1, k), bk)  # [M, K], [M, ceil(K / bk)]
            y = quant_gemm.w8a8_block_fp8_matmul(xq, xs, weight, weight_scale, (bn, bk), out_dtype=x.dtype, bias=bias)
            return y.reshape(*x.shape[:-1], n)
        if k % 4 == 0:
            return quant_gemm.fp8_w8a16_gemm(x, weight, weight_scale, block_size=(bn, bk), bias=bias)
    if dynamic_per_group and not x.is_cuda:
        x = _fake_quant(x, bk)
    per_weight = weight_scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]  # [N, K]
    return F.linear(x, (weight.to(weight_scale.dtype) * per_weight).to(x.dtype), bias)
