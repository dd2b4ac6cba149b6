"""The quantized-GEMM kernels (``pageant.kernels.quant_gemm``) against their float32 references on
CUDA, at Llama-3.1-8B shapes, in bfloat16 and float16; and gemm.py's dispatch there.

Each list's first case is small (the one the CPU dry run keeps). The reference runs on the same
device in float32 on the same quantized tensors; ``||out - ref|| / ||ref||`` under ``REL_TOL``.
The dynamic FP8 activation quantization is compared bit for bit (round to nearest even on both).
"""

from __future__ import annotations

import pytest
import torch

from pageant.engine.layers.quantization import gemm
from pageant.engine.layers.quantization.gptq import pack_int32
from pageant.kernels import quant_gemm as qg
from pageant.kernels import quant_gemm_reference as ref
from tests.gpu.conftest import assert_rel_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
# (M, N, K): a small case, then 8B's q/k/v at decode, gate/up at a small batch, down at prefill
SHAPES = {
    "small": (7, 72, 256),
    "qkv-t1": (1, 6144, 4096),
    "gate_up-t16": (16, 28672, 4096),
    "down-t512": (512, 4096, 14336),
}
# (bits, group_size, zero points stored, act-order g_idx, zero_offset)
INT_SCHEMES = {
    "w4-g128-ct-sym": (4, 128, False, False, 8),
    "w4-g128-gptq": (4, 128, True, False, 0),
    "w4-g128-act-order": (4, 128, True, True, 0),
    "w4-g32-awq": (4, 32, True, False, 0),
    "w8-channel-ct-sym": (8, -1, False, False, 128),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _x(m, k, dtype, device, seed):
    return torch.randn(m, k, generator=_gen(seed)).to(dtype).to(device)


def _fp8_weight(n, k, device, seed):
    return (torch.randn(n, k, generator=_gen(seed)) * 60).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", list(INT_SCHEMES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dequant_gemm(shape, scheme, dtype, device):
    (m, n, k), (bits, gs, has_zeros, act_order, offset) = SHAPES[shape], INT_SCHEMES[scheme]
    gen = _gen(bits + gs)
    groups = 1 if gs == -1 else k // gs
    qweight = pack_int32(torch.randint(0, 1 << bits, (n, k), generator=gen), bits).to(device)
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * 2 / (k**0.5 * (1 << bits))).to(dtype).to(device)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8).to(device) if has_zeros else None
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=gen)].to(torch.int32).to(device) if act_order else None
    x, bias = _x(m, k, dtype, device, seed=1), torch.randn(n, generator=gen).to(dtype).to(device)
    kw = dict(bits=bits, group_size=gs, zeros=zeros, g_idx=g_idx, zero_offset=offset, bias=bias)
    out = qg.dequant_gemm(x, qweight, scales, **kw)
    assert out.dtype == dtype and out.device.type == device
    assert_rel_close(out, ref.dequant_gemm(x.float(), qweight, scales, **kw), dtype, f"{scheme} {shape}")
    through_gemm_py = gemm.int_weight_gemm(x, qweight, scales, **kw)  # g_idx: contiguous check, then the kernel
    assert_rel_close(through_gemm_py, ref.dequant_gemm(x.float(), qweight, scales, **kw), dtype, "gemm.py")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block", [None, (128, 128)], ids=["channel", "block128"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_w8a16_gemm(shape, block, dtype, device):
    m, n, k = SHAPES[shape]
    w = _fp8_weight(n, k, device, seed=2)
    grid = (n, 1) if block is None else (-(-n // block[0]), -(-k // block[1]))
    scale = ((torch.rand(grid, generator=_gen(3)) + 0.5) / (60 * k**0.5)).to(dtype).to(device)
    x = _x(m, k, dtype, device, seed=4)
    out = qg.fp8_w8a16_gemm(x, w, scale, block_size=block)
    assert_rel_close(out, ref.fp8_w8a16_gemm(x.float(), w, scale, block_size=block), dtype, f"fp8 {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [128, "K"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_per_token_group_quant_fp8(shape, group, dtype, device):
    m, _, k = SHAPES[shape]
    x = (_x(m, k, torch.float32, device, seed=5) * 3).to(dtype)
    gs = k if group == "K" else group
    q, s = qg.per_token_group_quant_fp8(x, gs)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x, gs)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _needs_fp8_tensor_cores(device):
    if device == "cuda" and not gemm.fp8_matmul_supported(torch.device("cuda")):
        pytest.skip("FP8 tensor cores (sm_89+) needed; this GPU runs the weight-only path instead")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_w8a8_block_fp8(shape, dtype, device):
    _needs_fp8_tensor_cores(device)
    m, n, k = SHAPES[shape]
    w = _fp8_weight(n, k, device, seed=6)
    ws = ((torch.rand(-(-n // 128), -(-k // 128), generator=_gen(7)) + 0.5) / (60 * k**0.5)).to(device)
    x = _x(m, k, dtype, device, seed=8)
    xq, xs = ref.per_token_group_quant_fp8(x, 128)
    out = qg.w8a8_block_fp8_matmul(xq, xs, w, ws, (128, 128), out_dtype=dtype)
    assert_rel_close(out, ref.w8a8_block_fp8_gemm(xq, xs, w, ws, (128, 128), out_dtype=torch.float32), dtype, shape)
    through_gemm_py = gemm.block_fp8_gemm(x, w, ws, (128, 128), dynamic_per_group=True)
    assert_rel_close(through_gemm_py, ref.block_fp8_gemm(x.float(), w, ws, (128, 128)), dtype, "gemm.py")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_scaled_mm(shape, dtype, device):
    _needs_fp8_tensor_cores(device)
    m, n, k = SHAPES[shape]
    w = _fp8_weight(n, k, device, seed=9)
    ws = ((torch.rand(n, 1, generator=_gen(10)) + 0.5) / (60 * k**0.5)).to(dtype).to(device)
    x = _x(m, k, dtype, device, seed=11)
    expected = ref.fp8_scaled_mm(x.float(), w, ws)  # the same quantized activations, float32 product
    assert_rel_close(qg.fp8_scaled_mm(x, w, ws), expected, dtype, shape)
    assert_rel_close(gemm.fp8_gemm(x, w, ws, dynamic_per_token=True), expected, dtype, "gemm.py")
