"""Triton quantized GEMMs ``y[M, N] = x[M, K] @ dequant(W)^T (+ bias)``, float32 accumulation.

Same signatures and layouts as ``pageant.kernels.quant_gemm_reference`` (see its docstring): the
kernels read the weights as the engine keeps them, no repacking at load time.

- ``dequant_gemm``: W4A16 / W8A16 (``_dequant_gemm_kernel``). Program ``(n, m, split)`` loads
  ``[BLOCK_N, BLOCK_K / pack]`` int32 words (contiguous along K: 16-byte loads), unpacks them in
  registers to ``[BLOCK_N, BLOCK_K]``, subtracts the zero point, multiplies the scale in float32,
  casts to the activation dtype and ``tl.dot``s. When ``BLOCK_K`` divides the group size a tile is
  one group (one scale per output row, ``GROUPS=0``); otherwise, and for GPTQ act-order ``g_idx``,
  scales and zeros are gathered per element (``GROUPS=1`` / ``2``, correct for any ``g_idx``, more
  loads, all from L1; vLLM instead permutes K at load time so that groups become contiguous).
- ``fp8_w8a16_gemm``: the same kernel with ``FP8=True``: the e4m3 bytes are decoded with integer
  ops (no fp8 instructions, so it also runs before sm_89), per-row or block scales.
- ``per_token_group_quant_fp8``: dynamic activation quantization (``_group_quant_fp8_kernel``),
  one program per (token, group), round-to-nearest-even done in float32 arithmetic (so the
  interpreter, whose fp8 cast rounds otherwise, agrees with the GPU's ``cvt.rn``).
- ``w8a8_block_fp8_matmul``: FP8 x FP8 ``tl.dot`` per 128-wide K block, times the activation
  group scale and the weight block scale (vLLM's ``w8a8_block_fp8_matmul``); needs sm_89+.
- ``fp8_scaled_mm``: per-token FP8 activations and ``torch._scaled_mm`` with row-wise scales.

Block sizes are fixed (no autotuning): decode-sized ``M <= 16`` uses 16 x 64 tiles and splits K
across programs until there are about two programs per SM (partial sums in float32, summed by
torch); larger ``M`` uses 64 x 64 tiles. No launch reads device data on the host (capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pageant.kernels.quant_gemm_reference import FP8_EPS, FP8_MAX
from pageant.kernels.triton_utils import check_device, device_sms, dot, dot_settings, last_dim_contiguous

__all__ = ["dequant_gemm", "fp8_w8a16_gemm", "per_token_group_quant_fp8", "w8a8_block_fp8_matmul", "fp8_scaled_mm"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _e4m3_to_f32(q):
    """float8_e4m3fn bytes (int32 in [0, 256)) -> float32: the 7 magnitude bits placed in a float16
    are the value times 2**-8 (normal and subnormal alike; e4m3fn has no infinities)."""
    bits = ((q & 0x80) << 8) | ((q & 0x7F) << 7)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _dequant_gemm_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, ceil(K / PACK)] int32, PACK = 32 // BITS values per word along K
    s_ptr,  # [ceil(N / SCALE_N), groups] scales
    z_ptr,  # [N, groups] int8 / uint8 zero points (read when HAS_ZEROS)
    g_ptr,  # [K] int32 group of each input column (read when GROUPS == 2)
    b_ptr,  # [N] bias (read when HAS_BIAS)
    y_ptr,  # [M, N] output, or [num_splits, M, N] float32 partial sums when SPLIT
    M, N, K, group_size, k_per_split,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym, stride_ysplit,
    BITS: tl.constexpr,
    FP8: tl.constexpr,  # W holds e4m3 bytes (BITS == 8), no zero points
    ZERO_OFFSET: tl.constexpr,  # subtracted from every stored value (compressed-tensors: 2**(BITS-1))
    SCALE_N: tl.constexpr,  # output rows per scale row (1; block FP8: block_n)
    GROUPS: tl.constexpr,  # 0: a K tile is one group; 1: column k in group k // group_size; 2: g_idx
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    s_rows = s_ptr + (offs_n // SCALE_N)[:, None] * stride_sn  # [BLOCK_N, 1]
    z_rows = z_ptr + offs_n[:, None] * stride_zn  # [BLOCK_N, 1]
    shifts = tl.arange(0, PACK) * BITS  # [PACK]
    num_words = tl.cdiv(K, PACK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        offs_w = k0 // PACK + tl.arange(0, WORDS)  # [WORDS]
        words = tl.load(w_rows + offs_w[None, :], mask=mask_n[:, None] & (offs_w < num_words)[None, :], other=0)
        q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, WORDS, PACK]
        q = tl.reshape(q, (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K]: column j is input k0 + j
        if FP8:
            w = _e4m3_to_f32(q)
        else:
            w = (q - ZERO_OFFSET).to(tl.float32)
        if GROUPS == 0:  # one group per tile: one scale (and zero) per output row
            g = k0 // group_size
            if HAS_ZEROS:
                w -= tl.load(z_rows + g, mask=mask_n[:, None], other=0).to(tl.float32)
            w *= tl.load(s_rows + g, mask=mask_n[:, None], other=0.0).to(tl.float32)
        else:
            if GROUPS == 2:
                g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)[None, :]  # [1, BLOCK_K]
            else:
                g = (offs_k // group_size)[None, :]
            mask_nk = mask_n[:, None] & mask_k[None, :]
            if HAS_ZEROS:
                w -= tl.load(z_rows + g, mask=mask_nk, other=0).to(tl.float32)
            w *= tl.load(s_rows + g, mask=mask_nk, other=0.0).to(tl.float32)
        acc += dot(x, tl.trans(w.to(x.dtype)), PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        dst = y_ptr + pid_k * stride_ysplit + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(dst, acc, mask=mask_mn)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask_mn)


def _tiles(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K preference, num_warps): decode 16 x 64 x 64 (4 warps), else
    64 x 64 x 64 (8 warps: at 4, or with 128-wide K tiles at decode, the unpacked int4 tiles spilled
    registers on sm_90); float32 (3xTF32 dots) takes 32-wide K tiles."""
    block_k = 64 if dtype != torch.float32 else 32
    return (16, 64, block_k, 4) if m <= 16 else (64, 64, block_k, 8)


def _split_k(tiles: int, m: int, k: int, block_k: int, device: torch.device, split_k: int | None) -> tuple[int, int]:
    """(num_splits, k_per_split): decode-sized M splits K until there are ~2 programs per SM, each
    split at least 512 columns (or 4 tiles); ``split_k`` forces a count (tests)."""
    if split_k is None:
        split_k = 1
        if m <= 16:
            split_k = max(1, min(triton.cdiv(2 * device_sms(device), tiles), k // max(512, 4 * block_k)))
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    per = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return triton.cdiv(k, per), per


def _launch_dequant(x, words, scales, zeros, g_idx, bias, *, bits, fp8, zero_offset, scale_n, group_size,
                    tile_group, split_k) -> torch.Tensor:
    """Shared launch of ``_dequant_gemm_kernel`` (x: ``[..., K]``; shapes already checked)."""
    k, n = x.shape[-1], words.shape[0]
    x2 = last_dim_contiguous(x.reshape(-1, k))  # [M, K]
    m = x2.shape[0]
    block_m, block_n, block_k, warps = _tiles(m, x.dtype)
    if g_idx is not None:
        mode = 2
    elif tile_group % block_k == 0 or tile_group >= k:
        mode = 0
    elif tile_group % 16 == 0:  # the largest power of two <= block_k dividing the group
        mode, block_k = 0, min(block_k, tile_group & -tile_group)
    else:
        mode = 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    splits, per = _split_k(grid_n * grid_m, m, k, block_k, x.device, split_k)
    out = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    precision, upcast = dot_settings(x.dtype)
    dummy = scales  # never read: the flags turn its loads off
    _dequant_gemm_kernel[(grid_n, grid_m, splits)](
        x2, words, scales, zeros if zeros is not None else dummy, g_idx if g_idx is not None else dummy,
        bias if bias is not None else dummy, out,
        m, n, k, group_size, per,
        x2.stride(0), words.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        n, m * n,
        BITS=bits, FP8=fp8, ZERO_OFFSET=zero_offset, SCALE_N=scale_n, GROUPS=mode,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT=splits > 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, UPCAST=upcast,
        num_warps=warps, num_stages=3,
    )
    if splits > 1:
        acc = out.sum(0)  # [M, N] float32
        if bias is not None:
            acc = acc + bias.float()
        y.copy_(acc)
    return y.reshape(*x.shape[:-1], n)


def _check_x(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"{what}: activations are {x.dtype}, expected float16, bfloat16 or float32")


def _check_bias(bias, n: int, what: str) -> None:
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{what}: bias has shape {tuple(bias.shape)}, expected ({n},)")


def dequant_gemm(x, qweight, scales, *, bits: int, group_size: int = -1, zeros=None, g_idx=None,
                 zero_offset: int = 0, bias=None, split_k: int | None = None) -> torch.Tensor:
    """W4A16 / W8A16: ``x [..., K] @ W.T (+ bias)`` for the engine's packed integer ``W`` (layout:
    ``quant_gemm_reference``), in x's dtype. ``group_size`` -1: per-channel scales."""
    _check_x(x, "dequant_gemm")
    if bits not in (4, 8):
        raise ValueError(f"dequant_gemm: bits must be 4 or 8, got {bits}")
    k, n = x.shape[-1], qweight.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape[1] != triton.cdiv(k, 32 // bits):
        raise ValueError(f"dequant_gemm: qweight is {qweight.dtype} {tuple(qweight.shape)}, expected int32 "
                         f"[N, {triton.cdiv(k, 32 // bits)}] ({k} {bits}-bit inputs)")
    groups = 1 if group_size == -1 else triton.cdiv(k, group_size) if group_size > 0 else 0
    if groups == 0 or (g_idx is None and scales.shape != (n, groups)):
        raise ValueError(f"dequant_gemm: scales {tuple(scales.shape)} do not fit N={n}, K={k}, group_size {group_size}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype not in (torch.int8, torch.uint8)):
        raise ValueError(f"dequant_gemm: zeros are {zeros.dtype} {tuple(zeros.shape)}, expected int8/uint8 "
                         f"{tuple(scales.shape)}")
    if g_idx is not None and (g_idx.shape != (k,) or g_idx.dtype != torch.int32 or scales.shape[0] != n):
        raise ValueError(f"dequant_gemm: g_idx is {g_idx.dtype} {tuple(g_idx.shape)}, expected int32 ({k},)")
    _check_bias(bias, n, "dequant_gemm")
    check_device(*(t for t in (x, qweight, scales, zeros, g_idx, bias) if t is not None))
    scales, qweight = last_dim_contiguous(scales), last_dim_contiguous(qweight)
    return _launch_dequant(x, qweight, scales, zeros, g_idx, bias, bits=bits, fp8=False, zero_offset=zero_offset,
                           scale_n=1, group_size=k if group_size == -1 else group_size,
                           tile_group=k if group_size == -1 else group_size, split_k=split_k)


def fp8_w8a16_gemm(x, weight, weight_scale, *, block_size=None, bias=None, split_k: int | None = None) -> torch.Tensor:
    """Weight-only FP8: ``x @ (weight * scale).T (+ bias)``, e4m3 bytes upcast in registers;
    ``weight_scale`` per row ``[N, 1]`` / ``[N]``, or ``[ceil(N / bn), ceil(K / bk)]`` with
    ``block_size = (bn, bk)``. K must be a multiple of 4 (the bytes are read as int32 words)."""
    _check_x(x, "fp8_w8a16_gemm")
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn or x.shape[-1] != k or k % 4:
        raise ValueError(f"fp8_w8a16_gemm: weight is {weight.dtype} {tuple(weight.shape)}, expected float8_e4m3fn "
                         f"[N, {x.shape[-1]}] with K a multiple of 4")
    if block_size is None:
        if weight_scale.numel() != n:
            raise ValueError(f"fp8_w8a16_gemm: per-row scales have shape {tuple(weight_scale.shape)}, expected ({n}, 1)")
        scale, scale_n, group = weight_scale.reshape(n, 1), 1, k
    else:
        bn, bk = (int(v) for v in block_size)
        if weight_scale.shape != (triton.cdiv(n, bn), triton.cdiv(k, bk)):
            raise ValueError(f"fp8_w8a16_gemm: block scales have shape {tuple(weight_scale.shape)}, expected "
                             f"{(triton.cdiv(n, bn), triton.cdiv(k, bk))} for {bn} x {bk} blocks")
        scale, scale_n, group = weight_scale, bn, bk
    _check_bias(bias, n, "fp8_w8a16_gemm")
    check_device(*(t for t in (x, weight, weight_scale, bias) if t is not None))
    words = last_dim_contiguous(weight).view(torch.int32)  # [N, K / 4]: 4 e4m3 bytes per word
    return _launch_dequant(x, words, last_dim_contiguous(scale), None, None, bias, bits=8, fp8=True, zero_offset=0,
                           scale_n=scale_n, group_size=group, tile_group=group, split_k=split_k)


@triton.jit
def _round_e4m3(v):
    """Round float32 ``v`` (|v| <= 448) to the nearest-even e4m3 value, in float32 (sign kept: -0.0)."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # exponent; subnormals share -6
    inv_ulp = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e): 3 mantissa bits
    r = tl.abs(v) * inv_ulp  # exact (a power of two), r < 16
    r = (r + 8388608.0) - 8388608.0  # 2**23: the add rounds r to an integer, ties to even
    r = r * ((e + 124) << 23).to(tl.float32, bitcast=True)  # times 2**(e - 3)
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _group_quant_fp8_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # [M, K] float8_e4m3fn
    s_ptr,  # [M, groups] float32
    K, group_size, stride_xm, stride_qm, stride_sm, eps,
    FP8_MAX_VALUE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
    lo = grp * group_size
    hi = tl.minimum(lo + group_size, K)
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < hi, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), eps), FP8_MAX_VALUE)  # IEEE (`/` is div.approx)
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < hi, other=0.0).to(tl.float32)
        v = tl.clamp(tl.math.div_rn(v, tl.zeros_like(v) + scale), -FP8_MAX_VALUE, FP8_MAX_VALUE)
        tl.store(q_ptr + row * stride_qm + offs, _round_e4m3(v).to(q_ptr.dtype.element_ty), mask=offs < hi)
    tl.store(s_ptr + row * stride_sm + grp, scale)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int, eps: float = FP8_EPS):
    """Dynamic FP8 activations: ``[M, K]`` -> (``[M, K]`` float8_e4m3fn, ``[M, ceil(K / group_size)]``
    float32 scales), one scale per token and group (``group_size = K``: per token)."""
    _check_x(x, "per_token_group_quant_fp8")
    if x.dim() != 2 or group_size <= 0:
        raise ValueError(f"per_token_group_quant_fp8: x must be [M, K] and group_size positive, got "
                         f"{tuple(x.shape)} and {group_size}")
    check_device(x)
    x = last_dim_contiguous(x)
    m, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m and k:
        chunk = min(1024, triton.next_power_of_2(group_size))
        _group_quant_fp8_kernel[(m, groups)](x, q, s, k, group_size, x.stride(0), q.stride(0), s.stride(0), eps,
                                             FP8_MAX_VALUE=FP8_MAX, CHUNK=chunk, num_warps=4 if chunk >= 512 else 1)
    return q, s


@triton.jit
def _w8a8_block_fp8_kernel(
    a_ptr,  # [M, K] float8_e4m3fn activations
    as_ptr,  # [M, ceil(K / BLOCK_K)] float32 activation scales
    b_ptr,  # [N, K] float8_e4m3fn weights
    bs_ptr,  # [ceil(N / GROUP_N), ceil(K / BLOCK_K)] weight block scales
    bias_ptr,  # [N] (read when HAS_BIAS)
    c_ptr,  # [M, N]
    M, N, K, stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the scale block along K (both operands)
):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_m, mask_n = offs_m < M, offs_n < N
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am  # [BLOCK_M, 1]
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_cols + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb, mask=mask_m, other=0.0)  # [BLOCK_M]
        b_s = tl.load(bs_ptr + (offs_n // GROUP_N) * stride_bsn + kb, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a8_block_fp8_matmul(xq, x_scale, weight, weight_scale, block_size, *, out_dtype, bias=None) -> torch.Tensor:
    """Block FP8: ``xq [M, K]`` e4m3 with ``x_scale [M, ceil(K / bk)]`` (``per_token_group_quant_fp8``
    with ``group_size = bk``) times ``weight [N, K]`` e4m3 with ``weight_scale [ceil(N / bn), ceil(K / bk)]``
    -> ``[M, N]`` in ``out_dtype``. ``bk`` must be a power of two in [16, 128]."""
    bn, bk = (int(v) for v in block_size)
    m, k = xq.shape
    n = weight.shape[0]
    if xq.dtype != torch.float8_e4m3fn or weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k:
        raise ValueError(f"w8a8_block_fp8_matmul: expected float8_e4m3fn x [M, K] and weight [N, K], got "
                         f"{xq.dtype} {tuple(xq.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if bk not in (16, 32, 64, 128) or bn <= 0:
        raise ValueError(f"w8a8_block_fp8_matmul: block_size {tuple(block_size)} unsupported (block_k 16..128, a power of 2)")
    if x_scale.shape != (m, triton.cdiv(k, bk)) or weight_scale.shape != (triton.cdiv(n, bn), triton.cdiv(k, bk)):
        raise ValueError(f"w8a8_block_fp8_matmul: scales {tuple(x_scale.shape)} / {tuple(weight_scale.shape)} do not "
                         f"fit M={m}, N={n}, K={k} in {bn} x {bk} blocks")
    if out_dtype not in _ACT_DTYPES:
        raise ValueError(f"w8a8_block_fp8_matmul: out_dtype {out_dtype} is not float16, bfloat16 or float32")
    _check_bias(bias, n, "w8a8_block_fp8_matmul")
    check_device(*(t for t in (xq, x_scale, weight, weight_scale, bias) if t is not None))
    xq, weight = last_dim_contiguous(xq), last_dim_contiguous(weight)
    x_scale, weight_scale = last_dim_contiguous(x_scale.float()), last_dim_contiguous(weight_scale)
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    block_m = 16 if m <= 16 else 64
    block_n = 64 if m <= 16 else 128
    _w8a8_block_fp8_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        xq, x_scale, weight, weight_scale, bias if bias is not None else x_scale, y,
        m, n, k, xq.stride(0), x_scale.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0),
        GROUP_N=bn, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk,
        num_warps=4, num_stages=3,
    )
    return y


def fp8_scaled_mm(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """Dynamic per-token FP8 activations times ``weight [N, K]`` e4m3 with per-row scales, on
    ``torch._scaled_mm`` (sm_89+ on CUDA; K and N multiples of 16). bfloat16 uses its row-wise
    scales directly; other dtypes take a float32 product with unit scales, scaled after."""
    _check_x(x, "fp8_scaled_mm")
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn or x.shape[-1] != k or weight_scale.numel() != n:
        raise ValueError(f"fp8_scaled_mm: weight {weight.dtype} {tuple(weight.shape)} / scale "
                         f"{tuple(weight_scale.shape)} do not fit x {tuple(x.shape)}")
    _check_bias(bias, n, "fp8_scaled_mm")
    xq, xs = per_token_group_quant_fp8(x.reshape(-1, k), k)  # [M, K], [M, 1]
    ws = weight_scale.float().reshape(1, n)  # [1, N]
    if x.dtype == torch.bfloat16:
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)
        y = y if bias is None else y + bias
    else:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32) * xs * ws
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
