"""Quantized GEMMs: the Triton kernels (interpreter) against their float32 PyTorch references, the
references against the engine's own CPU dequantization of what its loaders store, the CPU path of
``gemm.py`` bit for bit against the quant methods' dequantize-then-``F.linear``, and gemm.py's
CUDA dispatch (kernels run in the interpreter on CPU tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pageant.engine.layers.linear import ReplicatedLinear
from pageant.engine.layers.quantization import gemm
from pageant.engine.layers.quantization.awq import AWQ_ORDER, AwqMethod
from pageant.engine.layers.quantization.gptq import GptqMethod, pack_int32
from pageant.kernels import quant_gemm as qg
from pageant.kernels import quant_gemm_reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# ||out - ref|| / ||ref||: fp32 kernels use 3xTF32 dots; 16-bit ones round the weight tile to the
# activation dtype (the reference keeps it in fp32) and the output once; the interpreter's
# float32 -> bfloat16 cast truncates (kernels/NOTES.md)
REL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all()
    a, e = actual.double(), expected.double()
    err = float((a - e).norm() / e.norm().clamp_min(1e-30))
    assert err <= REL[expected.dtype], f"relative error {err:.3g} > {REL[expected.dtype]:g}"
    assert (a - e).abs().max() <= 8 * REL[expected.dtype] * e.abs().max()


def int_problem(m, n, k, bits, group_size, asym, dtype, seed=0, g_idx=None):
    """Random packed weights in the engine's layout, scales sized so outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    pack = 32 // bits
    words = -(-k // pack)
    q = torch.randint(0, 1 << bits, (n, words * pack), generator=gen)
    groups = 1 if group_size == -1 else -(-k // group_size)
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * 2 / (k**0.5 * (1 << bits))).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen, dtype=torch.uint8) if asym else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, pack_int32(q, bits), scales, zeros, bias


# (M, N, K): ragged M (1, 7, 33), N not a multiple of the 64-wide tiles, K a multiple of every group
SHAPES = [(1, 40, 256), (7, 72, 384), (33, 24, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_dequant_gemm(dtype, bits, group_size, asym):
    for i, (m, n, k) in enumerate(SHAPES):
        x, qw, s, z, b = int_problem(m, n, k, bits, group_size, asym, dtype, seed=i)
        offset = 0 if asym else 1 << (bits - 1)  # compressed-tensors' symmetric storage offset
        kw = dict(bits=bits, group_size=group_size, zeros=z, zero_offset=offset, bias=b if i != 1 else None)
        check(qg.dequant_gemm(x, qw, s, **kw), ref.dequant_gemm(x, qw, s, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", ["k100-channel", "g48", "g40-gather", "split3"])
def test_dequant_gemm_odd_shapes(dtype, case):
    """K not a multiple of the words (compressed-tensors pads the last word), groups a tile does not
    divide (16-wide tiles; per-element group gather), split-K with partial sums."""
    m, n, k, gs, split = {"k100-channel": (7, 33, 100, -1, 2), "g48": (5, 20, 192, 48, None),
                          "g40-gather": (33, 20, 120, 40, None), "split3": (3, 70, 512, 64, 3)}[case]
    for bits in (4, 8):
        x, qw, s, z, b = int_problem(m, n, k, bits, gs, True, dtype, seed=bits)
        kw = dict(bits=bits, group_size=gs, zeros=z, bias=b)
        check(qg.dequant_gemm(x, qw, s, split_k=split, **kw), ref.dequant_gemm(x, qw, s, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_dequant_gemm_act_order_g_idx(dtype, bits):
    """GPTQ act-order: the groups follow a permutation of the input columns (last group partial)."""
    gen = torch.Generator().manual_seed(bits)
    for m, (n, k, gs) in ((1, (24, 256, 32)), (33, (40, 96, 40))):
        x, qw, s, z, b = int_problem(m, n, k, bits, gs, True, dtype, seed=m)
        g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=gen)].to(torch.int32)
        for split in (None, 2):
            kw = dict(bits=bits, group_size=gs, zeros=z, g_idx=g_idx, bias=b)
            check(qg.dequant_gemm(x, qw, s, split_k=split, **kw), ref.dequant_gemm(x, qw, s, **kw))


def fp8_weight(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    w.view(torch.uint8)[0, :6] = torch.tensor([0x00, 0x01, 0x07, 0x80, 0x81, 0xFE], dtype=torch.uint8)  # subnormals
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("block", [None, (128, 128), (32, 64)], ids=["channel", "b128", "b32x64"])
def test_fp8_w8a16_gemm(dtype, block):
    for i, (m, n, k) in enumerate([(1, 40, 256), (7, 200, 300), (33, 72, 64)]):
        w = fp8_weight(n, k, seed=i)
        shape = (n, 1) if block is None else (-(-n // block[0]), -(-k // block[1]))
        gen = torch.Generator().manual_seed(i)
        scale = ((torch.rand(shape, generator=gen) + 0.5) / (60 * k**0.5)).to(dtype)
        x, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
        check(qg.fp8_w8a16_gemm(x, w, scale, block_size=block, bias=b),
              ref.fp8_w8a16_gemm(x, w, scale, block_size=block, bias=b))


def test_fp8_decode_is_exact_for_every_code():
    """All 254 finite e4m3 codes (both zeros, subnormals, ±448) decode exactly: an identity GEMM."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F][:252]  # drop the NaNs; 252: K a multiple of 4
    w = codes.view(torch.float8_e4m3fn).reshape(1, -1).expand(16, -1).contiguous()  # [16, 252]
    y = qg.fp8_w8a16_gemm(torch.eye(252), w, torch.ones(16, 1))  # [252, 16]
    assert torch.equal(y.t(), w.float())


def tie_rows(k: int) -> torch.Tensor:
    """Rows whose amax is 448 (scale 1): exact e4m3 ties (round to even, with carries), subnormal
    ties, values past the largest step."""
    row = torch.zeros(k)
    row[:10] = torch.tensor([448.0, 17.0, 19.0, 31.0, -13.5, 2.5 * 2**-9, 1.5 * 2**-9, -0.5 * 2**-9, 440.0, 0.0])
    return torch.stack([row, row * 2**-20])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("group_size", [128, 64, "K"])
def test_per_token_group_quant_fp8_is_exact(dtype, group_size):
    gen = torch.Generator().manual_seed(1)
    k = 300  # the last group is short
    x = torch.cat([torch.randn(7, k, generator=gen) * 3, tie_rows(k), torch.zeros(1, k)]).to(dtype)
    gs = k if group_size == "K" else group_size
    q, s = qg.per_token_group_quant_fp8(x, gs)
    q_ref, s_ref = ref.per_token_group_quant_fp8(x, gs)
    assert q.dtype == torch.float8_e4m3fn and s.shape == s_ref.shape == (10, -(-k // gs))
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_w8a8_block_fp8_matmul(out_dtype, block):
    """N and K not multiples of the blocks (partial last blocks), ragged M."""
    for i, (m, n, k) in enumerate([(1, 200, 300), (7, 130, 256), (33, 64, 160)]):
        gen = torch.Generator().manual_seed(i)
        x = (torch.randn(m, k, generator=gen) * 2).to(out_dtype)
        w = fp8_weight(n, k, seed=i)
        ws = (torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) + 0.5) / (60 * k**0.5)
        xq, xs = ref.per_token_group_quant_fp8(x, block[1])
        b = torch.randn(n, generator=gen).to(out_dtype) if i != 1 else None
        check(qg.w8a8_block_fp8_matmul(xq, xs, w, ws, block, out_dtype=out_dtype, bias=b),
              ref.w8a8_block_fp8_gemm(xq, xs, w, ws, block, out_dtype=out_dtype, bias=b))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_fp8_scaled_mm(dtype):
    """Per-token FP8 activations on torch._scaled_mm (it has a CPU implementation too)."""
    for i, (m, n, k) in enumerate([(1, 48, 64), (33, 32, 128)]):
        gen = torch.Generator().manual_seed(i)
        x, w = torch.randn(m, k, generator=gen).to(dtype), fp8_weight(n, k, seed=i)
        ws = ((torch.rand(n, 1, generator=gen) + 0.5) / (60 * k**0.5)).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype)
        check(qg.fp8_scaled_mm(x, w, ws, b), ref.fp8_scaled_mm(x, w, ws, b))


def test_bad_arguments_name_the_problem():
    x, qw, s, z, _ = int_problem(2, 16, 64, 4, 32, True, torch.float32)
    with pytest.raises(ValueError, match="qweight"):
        qg.dequant_gemm(x[:, :32], qw, s, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        qg.dequant_gemm(x, qw, s, bits=3, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        qg.dequant_gemm(x, qw, s[:, :1], bits=4, group_size=32)
    with pytest.raises(ValueError, match="zeros"):
        qg.dequant_gemm(x, qw, s, bits=4, group_size=32, zeros=z.to(torch.int32))
    with pytest.raises(ValueError, match="activations"):
        qg.dequant_gemm(x.double(), qw, s, bits=4, group_size=32)
    w = fp8_weight(16, 66)
    with pytest.raises(ValueError, match="multiple of 4"):
        qg.fp8_w8a16_gemm(torch.zeros(1, 66), w, torch.ones(16, 1))
    with pytest.raises(ValueError, match="block scales"):
        qg.fp8_w8a16_gemm(torch.zeros(1, 64), fp8_weight(16, 64), torch.ones(2, 2), block_size=(16, 16))
    with pytest.raises(ValueError, match="block_size"):
        qg.w8a8_block_fp8_matmul(w, torch.ones(16, 1), w, torch.ones(1, 1), (16, 66), out_dtype=torch.float32)


# --- the engine's loaders and CPU path -------------------------------------------------------------

def linear_with(method, k: int, n: int, dtype=torch.float32) -> ReplicatedLinear:
    layer = ReplicatedLinear(k, n, bias=False, params_dtype=dtype)
    layer.set_quant_method(method)
    return layer


def load(layer, tensors: dict) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        layer.weight_loader(params[name], t)


def assert_cpu_path_unchanged(layer, run, weight_of) -> None:
    """``run(x)`` (gemm.py's CPU path) == ``F.linear(x, weight_of(dtype))`` bit for bit, per dtype."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, layer.input_size, generator=gen)
    for dtype in DTYPES:
        assert torch.equal(run(x.to(dtype)), F.linear(x.to(dtype), weight_of(dtype)))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_loader_reference_and_kernel_agree(bits, desc_act):
    k, n, gs = 128, 48, 32
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen)
    zeros = torch.randint(0, 1 << bits, (n, k // gs), generator=gen)
    g_idx = torch.arange(k) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    method = GptqMethod(bits, gs)
    layer = linear_with(method, k, n)
    load(layer, {"qweight": pack_int32(q, bits).t().contiguous(),  # checkpoint: [K / pack, N]
                 "qzeros": pack_int32(((zeros - 1) & ((1 << bits) - 1)).t(), bits),  # v1 stores zero - 1
                 "scales": (torch.rand(k // gs, n, generator=gen) + 0.5) / 100, "g_idx": g_idx.to(torch.int32)})
    kw = dict(bits=bits, group_size=gs, zeros=layer.qzeros, g_idx=layer.g_idx)
    w_ref = ref.dequantize_int_weight(layer.qweight, layer.scales, size_k=k, **kw)
    assert torch.equal(w_ref, method.dequantize(layer, torch.float32))
    assert torch.equal(ref.unpack_int_weight(layer.qweight, bits, k), q.to(torch.int32))
    x = torch.randn(7, k, generator=gen)
    check(qg.dequant_gemm(x, layer.qweight, layer.scales, **kw), x @ w_ref.t())
    assert_cpu_path_unchanged(layer, lambda x: gemm.int_weight_gemm(x, layer.qweight, layer.scales, **kw),
                              lambda dt: method.dequantize(layer, dt))


def test_awq_loader_reference_and_kernel_agree():
    k, n, gs = 128, 32, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // gs), generator=gen)

    def awq_pack(values):  # [rows, out] -> [rows, out / 8]: nibble j of word w holds output 8w + AWQ_ORDER[j]
        return pack_int32(values.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2), 4)

    method = AwqMethod(4, gs)
    layer = linear_with(method, k, n)
    load(layer, {"qweight": awq_pack(q.t()), "qzeros": awq_pack(zeros.t()),
                 "scales": (torch.rand(k // gs, n, generator=gen) + 0.5) / 100})
    kw = dict(bits=4, group_size=gs, zeros=layer.qzeros)
    w_ref = ref.dequantize_int_weight(layer.qweight, layer.scales, size_k=k, **kw)
    assert torch.equal(ref.unpack_int_weight(layer.qweight, 4, k), q.to(torch.int32))
    assert torch.equal(w_ref, method.dequantize(layer, torch.float32))
    x = torch.randn(7, k, generator=gen)
    check(qg.dequant_gemm(x, layer.qweight, layer.scales, **kw), x @ w_ref.t())
    assert_cpu_path_unchanged(layer, lambda x: gemm.int_weight_gemm(x, layer.qweight, layer.scales, **kw),
                              lambda dt: method.dequantize(layer, dt))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["channel-sym", "group-asym"])
def test_compressed_tensors_loader_reference_and_kernel_agree(bits, scheme):
    """Checkpoint tensors packed by compressed-tensors' own ``pack_to_int32`` (K = 100: a padded
    last word), loaded by the engine, then dequantized by the engine, the reference and the kernel."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from pageant.engine.layers.quantization.compressed_tensors import CompressedTensorsWNA16Method, WeightArgs

    group = scheme.startswith("group")
    k, n, gs = (128, 40, 32) if group else (100, 40, None)
    args = WeightArgs(num_bits=bits, type="int", strategy="group" if group else "channel",
                      symmetric=not group, group_size=gs, format="pack-quantized")
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    groups = k // gs if group else 1
    tensors = {"weight_packed": helpers.pack_to_int32(q, bits), "weight_shape": torch.tensor([n, k]),
               "weight_scale": (torch.rand(n, groups, generator=gen) + 0.5) / 100}
    if group:
        zp = torch.randint(lo, hi, (n, groups), generator=gen, dtype=torch.int8)
        tensors["weight_zero_point"] = helpers.pack_to_int32(zp, bits, packed_dim=0)
    method = CompressedTensorsWNA16Method(args)
    layer = linear_with(method, k, n)
    load(layer, tensors)
    zeros = getattr(layer, "weight_zero_point", None)
    kw = dict(bits=bits, group_size=gs if group else -1, zeros=zeros, zero_offset=1 << (bits - 1))
    w_ref = ref.dequantize_int_weight(layer.weight_packed, layer.weight_scale, size_k=k, **kw)
    assert torch.equal(w_ref, method.dequantize(layer, torch.float32))
    x = torch.randn(7, k, generator=gen)
    check(qg.dequant_gemm(x, layer.weight_packed, layer.weight_scale, **kw), x @ w_ref.t())
    assert_cpu_path_unchanged(layer, lambda x: gemm.int_weight_gemm(x, layer.weight_packed, layer.weight_scale, **kw),
                              lambda dt: method.dequantize(layer, dt))


def test_online_fp8_loader_reference_and_kernel_agree():
    from pageant.engine.layers.quantization.fp8 import Fp8OnlineLinearMethod

    k, n = 96, 48
    gen = torch.Generator().manual_seed(0)
    method = Fp8OnlineLinearMethod()
    layer = linear_with(method, k, n)
    load(layer, {"weight": torch.randn(n, k, generator=gen)})  # quantized per row as it loads
    w_ref = ref.dequantize_fp8(layer.weight, layer.weight_scale)
    scale = layer.weight_scale
    assert torch.equal(w_ref, layer.weight.float() * scale)
    x = torch.randn(7, k, generator=gen)
    check(qg.fp8_w8a16_gemm(x, layer.weight, scale), x @ w_ref.t())
    assert_cpu_path_unchanged(layer, lambda x: gemm.fp8_gemm(x, layer.weight, scale),
                              lambda dt: (layer.weight.to(scale.dtype) * scale).to(dt))


def test_block_fp8_cpu_path_and_kernels_agree():
    from pageant.engine.layers.quantization.fp8_block import BlockFp8Method

    k, n, block = 256, 192, (128, 128)
    gen = torch.Generator().manual_seed(0)
    method = BlockFp8Method(block)
    layer = linear_with(method, k, n)
    w = fp8_weight(n, k)
    load(layer, {"weight": w, "weight_scale_inv": (torch.rand(2, 2, generator=gen) + 0.5) / 100})
    scale = layer.weight_scale_inv
    w_ref = ref.dequantize_fp8(layer.weight, scale, block)
    assert torch.equal(w_ref, method.dequantize(layer, torch.float32))
    x = torch.randn(7, k, generator=gen)
    check(qg.fp8_w8a16_gemm(x, layer.weight, scale, block_size=block), x @ w_ref.t())
    assert_cpu_path_unchanged(layer, lambda x: gemm.block_fp8_gemm(x, layer.weight, scale, block),
                              lambda dt: method.dequantize(layer, dt))


# --- gemm.py's CUDA dispatch, with the kernels in the interpreter -----------------------------------

@pytest.fixture
def as_if_cuda(monkeypatch):
    """``as_if_cuda(fp8_tensor_cores)``: gemm.py takes CPU tensors for CUDA ones."""

    def patch(fp8_tensor_cores: bool) -> None:
        monkeypatch.setattr(gemm, "_on_gpu", lambda x: x.dtype in gemm._KERNEL_DTYPES)
        monkeypatch.setattr(gemm, "fp8_matmul_supported", lambda device: fp8_tensor_cores)

    return patch


def test_dispatch_int_weight_g_idx(as_if_cuda, monkeypatch):
    as_if_cuda(False)
    x, qw, s, z, b = int_problem(7, 40, 128, 4, 32, True, torch.float16)
    plain = (torch.arange(128) // 32).to(torch.int32)
    calls = []
    monkeypatch.setattr(qg, "dequant_gemm", lambda *a, **kw: calls.append(kw["g_idx"]) or ref.dequant_gemm(*a, **kw))
    gemm.int_weight_gemm(x, qw, s, bits=4, group_size=32, zeros=z, g_idx=plain, bias=b)
    assert calls[-1] is None and plain._pageant_contiguous[1] is True  # contiguous: the tile path
    shuffled = plain[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    y = gemm.int_weight_gemm(x, qw, s, bits=4, group_size=32, zeros=z, g_idx=shuffled, bias=b)
    assert calls[-1] is shuffled
    check(y, ref.dequant_gemm(x, qw, s, bits=4, group_size=32, zeros=z, g_idx=shuffled, bias=b))
    plain[0] = 1  # an in-place change (a reload) is seen: the cache is keyed by the tensor's version
    gemm.int_weight_gemm(x, qw, s, bits=4, group_size=32, zeros=z, g_idx=plain, bias=b)
    assert calls[-1] is plain


@pytest.mark.parametrize("fp8_tensor_cores", [True, False], ids=["sm90", "sm80"])
def test_dispatch_fp8(as_if_cuda, fp8_tensor_cores):
    as_if_cuda(fp8_tensor_cores)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 128, generator=gen).to(torch.bfloat16), fp8_weight(64, 128)
    ws = ((torch.rand(64, 1, generator=gen) + 0.5) / 500).to(torch.bfloat16)
    check(gemm.fp8_gemm(x, w, ws), ref.fp8_w8a16_gemm(x, w, ws))  # weight-only everywhere
    dynamic = ref.fp8_scaled_mm if fp8_tensor_cores else ref.fp8_w8a16_gemm
    check(gemm.fp8_gemm(x, w, ws, dynamic_per_token=True), dynamic(x, w, ws))
    bs = (torch.rand(1, 1, generator=gen) + 0.5) / 500
    blocked = (lambda: ref.block_fp8_gemm(x, w, bs, (128, 128))) if fp8_tensor_cores else \
        (lambda: ref.fp8_w8a16_gemm(x, w, bs, block_size=(128, 128)))
    check(gemm.block_fp8_gemm(x, w, bs, (128, 128), dynamic_per_group=True), blocked())


def test_cpu_dynamic_fp8_fake_quantizes_like_the_kernels():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 128, generator=gen), fp8_weight(32, 128)
    ws = (torch.rand(32, 1, generator=gen) + 0.5) / 500
    check(gemm.fp8_gemm(x, w, ws, dynamic_per_token=True), ref.fp8_scaled_mm(x, w, ws))
    bs = (torch.rand(1, 2, generator=gen) + 0.5) / 500
    check(gemm.block_fp8_gemm(x, w, bs, (128, 64), dynamic_per_group=True), ref.block_fp8_gemm(x, w, bs, (128, 64)))
