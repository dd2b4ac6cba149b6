"""FP8 (float8 e4m3) KV cache in the kernels: the Triton write stores exactly the reference's bytes
(``x / scale``, clamped to +-448, round to nearest even), the reference read equals attention over
the explicitly dequantized cache, and the Triton decode / prefill kernels equal the reference over an
FP8 cache (interpreter on the CPU). The sm_90 compile check includes the FP8-cache launches."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pageant.kernels import reference, triton_ops
from pageant.kernels.attention_decode import decode_attention
from pageant.kernels.attention_prefill import prefill_attention

FP8 = torch.float8_e4m3fn
ROOT = pathlib.Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fp8_paged(kv, k_scale: float, v_scale: float):
    """The paged cache ``kv`` (conftest's PagedKV) quantized to FP8 with the given scales, the scales
    as the engine passes them (float32 0-dim tensors). Unowned blocks keep a saturated poison (448)."""
    ks, vs = torch.tensor(k_scale), torch.tensor(v_scale)
    return reference.quantize_fp8(kv.k_cache, ks), reference.quantize_fp8(kv.v_cache, vs), ks, vs


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_stores_the_reference_bytes(dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 6, 8, 3, 24, 21
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 9]] = -1  # padding tokens: skipped
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(dtype)
    value = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 40).to(dtype)
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 1e-4, 0.0]).to(dtype)  # saturates / underflows
    k_scale, v_scale = torch.tensor(0.37), torch.tensor(2.5)
    init = reference.quantize_fp8(torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen), None)
    k_ref, v_ref, k_out, v_out = init.clone(), init.clone(), init.clone(), init.clone()
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots, k_scale=k_scale, v_scale=v_scale)
    triton_ops.reshape_and_cache(key, value, k_out, v_out, slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(k_out.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_out.view(torch.uint8), v_ref.view(torch.uint8))
    flat = k_ref.view(-1, num_kv_heads, head_dim)
    written = flat[slots[0]].float()
    assert written[0, :4].tolist() == [448.0, -448.0, 0.0, 0.0]  # clamped, not NaN; 1e-4 / 0.37 underflows
    want = (key[1].float() / k_scale).clamp(-448, 448)
    torch.testing.assert_close(flat[slots[1]].float(), want, rtol=2**-4, atol=2**-10)  # e4m3: 3 mantissa bits
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    before = init.view(-1, num_kv_heads, head_dim)[untouched]
    assert torch.equal(flat[untouched].view(torch.uint8), before.view(torch.uint8))


def test_rounding_is_to_nearest_even_over_the_whole_range():
    """A sweep over e4m3's whole range (ties, every binade, subnormals, saturation): the Triton
    write rounds exactly as torch's float8 cast (Triton's interpreter's own cast would not)."""
    values = torch.cat([
        torch.linspace(-470.0, 470.0, 30001), torch.linspace(-0.04, 0.04, 20001),
        torch.arange(256, dtype=torch.uint8).view(FP8).float().nan_to_num(0.0),  # every e4m3 value
        torch.randn(9000, generator=torch.Generator().manual_seed(0)) * 8,
    ])
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()  # sorted representable values
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: ties to even
    values = torch.cat([values, ties, -ties])
    values = torch.cat([values, values.new_zeros(-values.numel() % 1024)]).view(-1, 1, 1024)  # 1024 per program
    n = values.shape[0]
    ref, out = torch.zeros(n, 1, 1, 1024, dtype=FP8), torch.zeros(n, 1, 1, 1024, dtype=FP8)
    slots = torch.arange(n)
    reference.reshape_and_cache(values, values, ref, ref.clone(), slots)
    triton_ops.reshape_and_cache(values, values, out, out.clone(), slots)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(ref.view(-1).view(torch.uint8), values.view(-1).clamp(-448, 448).to(FP8).view(torch.uint8))


def test_reference_reads_dequantize(paged_kv):
    """Reference attention over an FP8 cache equals attention over ``cache.float() * scale``."""
    kv = paged_kv([9, 40, 17], 8, 2, 32, torch.float32, seed=4)
    k8, v8, ks, vs = fp8_paged(kv, 0.3, 1.7)
    k_deq, v_deq = k8.float() * ks, v8.float() * vs
    query = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(5))
    got = reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.2, k_scale=ks, v_scale=vs)
    want = reference.paged_attention_decode(query, k_deq, v_deq, kv.block_tables, kv.seq_lens, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the scales matter: reading with 1.0 is far off
    wrong = reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.2)
    assert (wrong - want).abs().max() > 0.1
    qsl = torch.tensor([0, 4, 5, 15], dtype=torch.int32)
    q = torch.randn(15, 8, 32, generator=torch.Generator().manual_seed(6))
    got = reference.paged_attention_prefill(q, k8, v8, kv.block_tables, qsl, kv.seq_lens, 0.2, k_scale=ks, v_scale=vs)
    want = reference.paged_attention_prefill(q, k_deq, v_deq, kv.block_tables, qsl, kv.seq_lens, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


DECODE_CASES = [
    # (seq_lens, block_size, num_heads, num_kv_heads, head_dim)
    ([1, 70, 17, 32], 16, 4, 4, 16),
    ([9, 64, 33], 8, 8, 2, 32),
    ([40, 23, 1], 8, 8, 1, 24),  # head_dim not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_over_fp8_matches_reference(case, dtype, num_splits, paged_kv, assert_close):
    seq_lens, block_size, num_heads, num_kv_heads, head_dim = DECODE_CASES[case]
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, seed=case)
    k8, v8, ks, vs = fp8_paged(kv, 0.05 + 0.3 * case, 2.0 - 0.4 * case)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(100 + case)).to(dtype)
    scale = 1.0 / math.sqrt(head_dim)
    expected = reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, scale, k_scale=ks, v_scale=vs)
    actual = decode_attention(query, k8, v8, kv.block_tables, kv.seq_lens, scale, num_splits=num_splits, block_n=16,
                              k_scale=ks, v_scale=vs)
    assert_close(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"sliding_window": 7, "logits_soft_cap": 5.0}])
def test_prefill_over_fp8_matches_reference(dtype, options, paged_kv, assert_close):
    """A fresh prompt, a 1-token extend and a chunk after a cached prefix, GQA 3."""
    kv = paged_kv([12, 33, 40], 8, 2, 32, torch.float32, seed=9)
    k8, v8, ks, vs = fp8_paged(kv, 0.6, 0.9)
    qsl = torch.tensor([0, 12, 13, 33], dtype=torch.int32)  # q_lens 12, 1, 20
    query = torch.randn(33, 6, 32, generator=torch.Generator().manual_seed(10)).to(dtype)
    args = (query, k8, v8, kv.block_tables, qsl, kv.seq_lens, 0.18)
    expected = reference.paged_attention_prefill(*args, k_scale=ks, v_scale=vs, **options)
    assert_close(triton_ops.paged_attention_prefill(*args, k_scale=ks, v_scale=vs, **options), expected)
    assert_close(prefill_attention(*args, block_m=16, block_n=16, k_scale=ks, v_scale=vs, **options), expected)


def test_public_decode_and_missing_scales_mean_one(paged_kv, assert_close):
    kv = paged_kv([3, 66], 16, 2, 32, torch.float32, seed=7)
    k8, v8, _, _ = fp8_paged(kv, 1.0, 1.0)
    query = torch.randn(2, 4, 32)
    one = torch.tensor(1.0)
    expected = reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.2, k_scale=one, v_scale=one)
    assert_close(triton_ops.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.2), expected)
    assert_close(reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.2), expected)


def test_bad_scales_and_mixed_caches_are_clear_errors():
    k8 = torch.zeros(2, 8, 1, 16, dtype=FP8)
    key = torch.zeros(3, 1, 16)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="k_scale must be a one-element float32 tensor"):
        triton_ops.reshape_and_cache(key, key, k8, k8.clone(), slots, k_scale=torch.ones(2), v_scale=torch.ones(()))
    with pytest.raises(ValueError, match="v_scale must be a one-element float32 tensor"):
        triton_ops.reshape_and_cache(key, key, k8, k8.clone(), slots, v_scale=torch.ones((), dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in dtype"):
        triton_ops.paged_attention_decode(torch.zeros(1, 1, 16), k8, torch.zeros(2, 8, 1, 16),
                                          torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.1)


def test_sm90_compile_check_covers_the_fp8_cache_launches():
    """``compile_check.standard_launches`` (what tests/kernels/test_compile_sm90.py compiles and
    checks for spills, 16-byte loads and tensor cores) includes decode, split-K decode, prefill and
    the cache write over an FP8 cache, for bf16 and fp32 queries, with float8 cache pointers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "import json; from pageant.kernels import compile_check as c\n"
        "rows = []\n"
        "for launch in c.standard_launches():\n"
        "    sig = c._signature(launch)[0]\n"
        "    rows.append([launch.label, launch.kernel.__name__, sig.get('k_cache_ptr')])\n"
        "print(json.dumps(rows))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    fp8 = {(label, kernel) for label, kernel, cache in rows if cache == "*fp8e4nv"}
    for query in ("bf16", "fp32"):
        for what, kernel in (("decode", "_decode_kernel"), ("decode split-K", "_decode_kernel"),
                             ("prefill", "_prefill_kernel"), ("reshape_and_cache", "_reshape_and_cache_kernel")):
            assert (f"fp8-kv {what} {query} h32/8 d128", kernel) in fp8
    assert ("fp8-kv prefill bf16 h16/8 d256 window+cap", "_prefill_kernel") in fp8
    assert all(label.startswith("fp8-kv") for label, _ in fp8)
