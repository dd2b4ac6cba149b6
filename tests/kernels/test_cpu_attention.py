"""The in-place CPU paged attention (``pageant.kernels.cpu_ops``, ``get_ops("torch")``) against the
PyTorch reference, which stays the ground truth: shuffled block tables, garbage padding entries,
GQA, odd head dims, windows and soft caps, half and FP8 caches; the build itself; the engine on it.

Half-precision outputs are compared with the reference run on float32 copies of the same inputs
(both kernels then do float32 math; the reference's bf16 SDPA prefill would be the looser one).
"""

from __future__ import annotations

import inspect
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pageant.kernels import cpu_attention, cpu_ops, get_ops, reference

OPTIONS = {"plain": {}, "window": {"sliding_window": 5}, "cap": {"logits_soft_cap": 1.5},
           "window+cap": {"sliding_window": 19, "logits_soft_cap": 2.0}}

DECODE_CASES = [
    # (seq_lens, block_size, num_heads, num_kv_heads, head_dim)
    ([37], 16, 8, 8, 64),  # batch 1, MHA (group 1)
    ([1, 16, 17, 31, 32, 33, 70], 16, 8, 4, 64),  # a 1-token context and block boundaries, group 2
    ([9, 64, 8, 1, 65], 8, 8, 2, 80),  # group 4, head_dim 80 (not a multiple of 64)
    ([100, 3, 32, 33, 64], 32, 16, 2, 128),  # group 8, block size 32
    ([5, 40, 1, 22], 8, 6, 2, 72),  # group 3; head_dim 72 (not a multiple of 16: scalar tails)
]

PREFILL_CASES = [
    # (seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim)
    ([20, 70, 9], [20, 70, 9], 16, 4, 4, 64),  # fresh prompts, MHA
    ([45, 33, 12, 16, 1], [13, 1, 0, 16, 1], 8, 8, 2, 80),  # cached prefixes, 1-token extends, an idle sequence
    ([130, 18], [40, 18], 32, 16, 2, 128),  # a long cached prefix, group 8
    ([37, 5], [30, 5], 16, 6, 2, 72),  # group 3
]


def _upcast(*tensors):
    return [None if t is None else t.float() for t in tensors]


def _query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def _garbage_padding(kv, big=True):
    """The block table with every entry past each sequence's blocks out of range."""
    tables = kv.block_tables.clone()
    for i, n in enumerate(kv.seq_lens.tolist()):
        nb = (n + kv.k_cache.shape[1] - 1) // kv.k_cache.shape[1]
        tables[i, nb:] = 2**30 if big else -7
    return tables


def test_the_extension_built_and_is_the_torch_backend():
    """CI machines have a C++ compiler: a failed build is a failure here, not a silent fallback."""
    info = cpu_attention.build_info()
    assert info["available"], f"the in-place CPU attention did not build: {info['error']}"
    assert get_ops("torch") is cpu_ops
    assert cpu_ops.paged_attention_decode is get_ops("torch").paged_attention_decode
    assert cpu_ops.paged_attention_decode is not reference.paged_attention_decode
    assert cpu_ops.paged_attention_prefill is not reference.paged_attention_prefill


def test_same_functions_and_signatures_as_reference():
    kernels = {name for name, value in vars(reference).items() if not name.startswith("_") and callable(value)
               and getattr(value, "__module__", "").startswith("pageant.kernels")}
    assert kernels | {"FP8_DTYPE", "FP8_MAX"} <= set(dir(cpu_ops)), "cpu_ops lacks a function of the reference"
    for name in ("paged_attention_decode", "paged_attention_prefill"):
        assert inspect.signature(getattr(cpu_ops, name)) == inspect.signature(getattr(reference, name))
    for name in ("reshape_and_cache", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "fused_moe"):
        assert getattr(cpu_ops, name) is getattr(reference, name)


@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
@pytest.mark.parametrize("option", OPTIONS)
def test_decode_matches_reference(case, option, monkeypatch, paged_kv):
    seq_lens, block_size, num_heads, num_kv_heads, head_dim = DECODE_CASES[case]
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, seed=case, extra_width=2)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(case))
    scale = 1.0 / math.sqrt(head_dim)
    opts = OPTIONS[option]
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale,
                                                **opts)
    # the in-place kernel ran (no fallback), and padding entries are never read
    monkeypatch.setattr(reference, "paged_attention_decode", None)
    for tables in (kv.block_tables, _garbage_padding(kv), _garbage_padding(kv, big=False)):
        actual = cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, tables, kv.seq_lens, scale, **opts)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 13, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_batches_of_mixed_lengths(batch, threads, paged_kv):
    """Lengths 1 .. 97 (a block of 8 and its boundaries among them), zero-length rows, 1 and 2 threads."""
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 98, (batch,), generator=gen).tolist()
    seq_lens[: min(batch, 4)] = [1, 8, 9, 16][: min(batch, 4)]
    if batch > 1:
        seq_lens[-1] = 0  # no context: zeros, as the reference gives
    kv = paged_kv(seq_lens, 8, 2, 64, torch.float32, seed=batch)
    query = torch.randn(batch, 8, 64, generator=gen)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, _garbage_padding(kv), kv.seq_lens,
                                                0.125)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if batch > 1:
        assert not actual[-1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["plain", "window+cap"])
def test_half_precision(dtype, option, paged_kv, assert_close):
    opts = OPTIONS[option]
    kv = paged_kv([1, 17, 40, 33], 16, 2, 64, dtype, seed=3)
    query = torch.randn(4, 8, 64).to(dtype)
    args = _upcast(query, kv.k_cache, kv.v_cache)
    expected = reference.paged_attention_decode(*args, kv.block_tables, kv.seq_lens, 0.125, **opts)
    actual = cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, **opts)
    assert_close(actual, expected.to(dtype))
    q_lens = [1, 9, 40, 20]
    qp = torch.randn(sum(q_lens), 8, 64).to(dtype)
    qsl = _query_start_loc(q_lens)
    expected = reference.paged_attention_prefill(qp.float(), *args[1:], kv.block_tables, qsl, kv.seq_lens, 0.125,
                                                 **opts)
    actual = cpu_ops.paged_attention_prefill(qp, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 0.125,
                                             **opts)
    assert_close(actual, expected.to(dtype))


@pytest.mark.parametrize("option", ["plain", "window+cap"])
def test_fp8_cache_with_scales(option, paged_kv):
    """An e4m3 cache holding k / k_scale: read as the reference reads it (dequantized, float32)."""
    opts = OPTIONS[option]
    kv = paged_kv([1, 30, 47, 16], 16, 2, 64, torch.float32, seed=5)
    k_scale, v_scale = torch.tensor(0.004), torch.tensor(0.0025)
    k8, v8 = reference.quantize_fp8(kv.k_cache, k_scale), reference.quantize_fp8(kv.v_cache, v_scale)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    query = torch.randn(4, 8, 64)
    expected = reference.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.125, **opts, **scales)
    actual = cpu_ops.paged_attention_decode(query, k8, v8, _garbage_padding(kv), kv.seq_lens, 0.125, **opts, **scales)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    q_lens = [1, 12, 47, 3]
    qp, qsl = torch.randn(sum(q_lens), 8, 64), _query_start_loc(q_lens)
    expected = reference.paged_attention_prefill(qp, k8, v8, kv.block_tables, qsl, kv.seq_lens, 0.125, **opts, **scales)
    actual = cpu_ops.paged_attention_prefill(qp, k8, v8, kv.block_tables, qsl, kv.seq_lens, 0.125, **opts, **scales)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # the scales are applied: without them the result differs
    unscaled = cpu_ops.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens, 0.125, **opts)
    assert not torch.allclose(unscaled, cpu_ops.paged_attention_decode(query, k8, v8, kv.block_tables, kv.seq_lens,
                                                                       0.125, **opts, **scales))


@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
@pytest.mark.parametrize("option", OPTIONS)
def test_prefill_matches_reference(case, option, monkeypatch, paged_kv):
    """Cached prefix + new tokens; also with one query position per work item (many items a sequence)."""
    seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim = PREFILL_CASES[case]
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, torch.float32, seed=10 + case, extra_width=2)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(case))
    qsl, scale, opts = _query_start_loc(q_lens), 1.0 / math.sqrt(head_dim), OPTIONS[option]
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens,
                                                 scale, **opts)
    monkeypatch.setattr(reference, "paged_attention_prefill", None)  # the in-place kernel ran
    tables = _garbage_padding(kv)
    actual = cpu_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, tables, qsl, kv.seq_lens, scale, **opts)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    one_each = cpu_attention.prefill(query, kv.k_cache, kv.v_cache, tables, qsl, kv.seq_lens, scale,
                                     opts.get("sliding_window"), opts.get("logits_soft_cap"), None, None,
                                     rows_per_item=1)
    torch.testing.assert_close(one_each, expected, rtol=1e-5, atol=1e-5)


def test_strided_inputs(paged_kv):
    """The engine's query is a view into the fused qkv projection; block tables may be column slices."""
    kv = paged_kv([1, 30, 47], 8, 2, 64, torch.float32, seed=7, extra_width=3)
    qkv = torch.randn(3, (8 + 2 * 2) * 64)
    query = qkv[:, : 8 * 64].view(3, 8, 64)  # [3, 8, 64], row stride 768
    tables = torch.cat([kv.block_tables, kv.block_tables], dim=1)[:, : kv.block_tables.shape[1]]
    assert not query.is_contiguous() and not tables.is_contiguous()
    expected = reference.paged_attention_decode(query.contiguous(), kv.k_cache, kv.v_cache, kv.block_tables,
                                                kv.seq_lens, 0.125)
    actual = cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, tables, kv.seq_lens, 0.125)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_run_the_reference(paged_kv):
    kv = paged_kv([5, 12], 8, 2, 32, torch.float32, seed=1)
    query = torch.randn(2, 4, 32, dtype=torch.float64)  # no float64 kernel: the reference's result
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2)
    actual = cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected)
    empty = cpu_ops.paged_attention_decode(query[:0], kv.k_cache, kv.v_cache, kv.block_tables[:0], kv.seq_lens[:0],
                                           0.2)
    assert empty.shape == (0, 4, 32)


def test_bad_inputs_raise_clear_errors(paged_kv):
    kv = paged_kv([5, 12], 8, 2, 32, torch.float32, seed=2)
    query = torch.randn(2, 4, 32)
    tables = kv.block_tables.clone()
    tables[1, 1] = kv.k_cache.shape[0] + 5  # inside sequence 1's 12 tokens
    with pytest.raises(IndexError, match="out of range"):
        cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, tables, kv.seq_lens, 0.2)
    with pytest.raises(ValueError, match="block table only"):
        cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables[:, :1], kv.seq_lens, 0.2)
    with pytest.raises(ValueError, match="query tokens but seq_len"):
        cpu_ops.paged_attention_prefill(torch.randn(9, 4, 32), kv.k_cache, kv.v_cache, kv.block_tables,
                                        _query_start_loc([6, 3]), kv.seq_lens, 0.2)
    with pytest.raises(ValueError, match="sliding_window"):
        cpu_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2,
                                       sliding_window=0)


FAILED_BUILD = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
from pageant.kernels import cpu_ops, cpu_attention, reference
q, k = torch.randn(1, 2, 16), torch.randn(4, 8, 2, 16)
tables, lens = torch.tensor([[2]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
out = cpu_ops.paged_attention_decode(q, k, k, tables, lens, 0.25)
ref = reference.paged_attention_decode(q, k, k, tables, lens, 0.25)
print("available", cpu_attention.available(), "equal", torch.equal(out, ref))
"""


def test_a_failed_build_warns_once_and_runs_the_reference(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'cpu_attention.cpp:1:1: error: simulated compiler failure' >&2\nexit 1\n")
    compiler.chmod(0o755)
    env = {**os.environ, "CXX": str(compiler), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", FAILED_BUILD], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "available False equal True" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "error: simulated compiler failure" in warnings[0], out.stderr


def _refuse(*args, **kwargs):
    raise AssertionError("the engine fell back to the reference attention")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft caps, 32-token windows on alternate layers
def test_engine_greedy_equals_transformers(make_checkpoint, hf_greedy, arch, monkeypatch):
    """Greedy decoding through the engine on get_ops("torch") equals transformers token for token;
    the reference attention is switched off, so every step ran the in-place kernels (decode,
    prefill, mixed steps, and chunked prefill over cached prefixes)."""
    import random

    from pageant.engine import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 70))] for _ in range(10)]
    path = make_checkpoint(arch)
    expected = hf_greedy(path, prompts, 10)
    monkeypatch.setattr(reference, "paged_attention_decode", _refuse)
    monkeypatch.setattr(reference, "paged_attention_prefill", _refuse)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kwargs in ({"block_size": 16, "max_num_seqs": 16},
                       {"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 16}):
            llm = LLM(model=path, **kwargs)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == expected, kwargs
    finally:
        torch.set_num_threads(old)


def test_benchmark_script_quick(tmp_path):
    """benchmarks/cpu_attention.py --quick: both kernels side by side, equal outputs, JSON and PNG."""
    import importlib.util
    import json

    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_attention.py"
    spec = importlib.util.spec_from_file_location("cpu_attention_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    old = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(old)
    (path,) = tmp_path.glob("cpu-attention-cpu-*.json")
    result = json.loads(path.read_text())
    assert [r["batch_size"] for r in result["decode"]] == [1, 4] and len(result["prefill"]) == 2
    assert all(r["max_abs_diff"] < 1e-5 and r["ratio_wall"] > 0 for r in result["decode"] + result["prefill"])
    assert path.with_suffix(".png").stat().st_size > 0
