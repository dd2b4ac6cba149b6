"""Sliding-window attention and attention-logit soft-capping (Gemma 2, Mistral, Phi-3).

The reference against a dense float64 re-implementation (explicit per-sequence masks) and against
transformers' own Gemma 2 eager attention and mask function; the Triton kernels (interpreter)
against the reference; and the options' validation.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from pageant.kernels import reference, triton_ops
from pageant.kernels.attention_decode import decode_attention
from pageant.kernels.attention_prefill import prefill_attention

# (sliding_window, logits_soft_cap): windows below, at and above the block size (8), one above
# every context (== no window), the cap alone and with a window
OPTIONS = [(1, None), (5, None), (8, None), (20, None), (40, None), (1000, None), (None, 2.0), (5, 2.0), (40, 30.0)]
# decode: a 1-token context, partial and full last blocks; GQA 4 (8 heads on 2 kv heads)
DECODE = dict(seq_lens=[1, 70, 17, 33, 8], block_size=8, num_heads=8, num_kv_heads=2, head_dim=16)
# prefill: cached prefixes (q_len < seq_len), a 1-token extend, an idle sequence, a fresh prompt,
# a long extend whose blocks cross many windows; GQA 3 (not a power of two)
PREFILL = dict(seq_lens=[45, 33, 12, 16, 100], q_lens=[13, 1, 0, 16, 60], block_size=8, num_heads=6, num_kv_heads=2,
               head_dim=16)


def _query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def dense_attention(query, kv, q_lens, scale, sliding_window=None, logits_soft_cap=None):
    """Straightforward float64 attention, one sequence at a time, with an explicit mask."""
    block_size, num_kv_heads = kv.k_cache.shape[1:3]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    start = 0
    for i, (n, q_len) in enumerate(zip(kv.seq_lens.tolist(), q_lens)):
        slots = [int(kv.block_tables[i, t // block_size]) * block_size + t % block_size for t in range(n)]
        k = kv.k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # [n, h, d]
        v = kv.v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        q = query[start : start + q_len].double()  # [q_len, h, d]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [h, q_len, n]
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        mask = torch.zeros(q_len, n, dtype=torch.bool)
        for j in range(q_len):
            pos = n - q_len + j
            for key in range(n):
                mask[j, key] = key <= pos and (sliding_window is None or pos - key < sliding_window)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", probs, v)
        start += q_len
    return out


def _decode_inputs(paged_kv, dtype=torch.float32, seed=0):
    c = DECODE
    kv = paged_kv(c["seq_lens"], c["block_size"], c["num_kv_heads"], c["head_dim"], dtype, seed=seed)
    query = torch.randn(len(c["seq_lens"]), c["num_heads"], c["head_dim"], generator=torch.Generator().manual_seed(seed + 1))
    return kv, query.to(dtype), c["head_dim"] ** -0.5


def _prefill_inputs(paged_kv, dtype=torch.float32, seed=0):
    c = PREFILL
    kv = paged_kv(c["seq_lens"], c["block_size"], c["num_kv_heads"], c["head_dim"], dtype, seed=seed)
    query = torch.randn(sum(c["q_lens"]), c["num_heads"], c["head_dim"], generator=torch.Generator().manual_seed(seed + 1))
    return kv, query.to(dtype), _query_start_loc(c["q_lens"]), c["head_dim"] ** -0.5


# --- the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "cap"), OPTIONS)
def test_reference_decode_matches_dense(window, cap, paged_kv):
    kv, query, scale = _decode_inputs(paged_kv)
    out = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale,
                                           sliding_window=window, logits_soft_cap=cap)
    expected = dense_attention(query, kv, [1] * len(DECODE["seq_lens"]), scale, window, cap)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "cap"), OPTIONS)
def test_reference_prefill_matches_dense(window, cap, paged_kv):
    kv, query, qsl, scale = _prefill_inputs(paged_kv)
    out = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale,
                                            sliding_window=window, logits_soft_cap=cap)
    expected = dense_attention(query, kv, PREFILL["q_lens"], scale, window, cap)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_window_longer_than_every_context_is_no_window(paged_kv):
    """The explicit path with a window that hides nothing equals the default SDPA path."""
    kv, query, scale = _decode_inputs(paged_kv, seed=3)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    torch.testing.assert_close(reference.paged_attention_decode(*args, sliding_window=70),
                               reference.paged_attention_decode(*args), rtol=1e-5, atol=1e-5)
    kv, query, qsl, scale = _prefill_inputs(paged_kv, seed=3)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    torch.testing.assert_close(reference.paged_attention_prefill(*args, sliding_window=100),
                               reference.paged_attention_prefill(*args), rtol=1e-5, atol=1e-5)


def test_reference_matches_transformers_gemma2_eager_attention(paged_kv):
    """transformers itself: Gemma 2's ``eager_attention_forward`` (soft cap) with the mask from
    ``masking_utils.sliding_window_causal_mask_function`` (Gemma 2's and Mistral's sliding layers),
    for one sequence with a cached prefix, GQA 2."""
    gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
    masking = pytest.importorskip("transformers.masking_utils")
    window, cap, scale = 6, 3.0, 0.5
    seq_len, q_len, num_heads, num_kv_heads, head_dim = 29, 11, 4, 2, 16
    kv = paged_kv([seq_len], 8, num_kv_heads, head_dim, torch.float32, seed=31)
    query = torch.randn(q_len, num_heads, head_dim, generator=torch.Generator().manual_seed(32))
    out = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, _query_start_loc([q_len]),
                                            kv.seq_lens, scale, sliding_window=window, logits_soft_cap=cap)
    slots = [int(kv.block_tables[0, t // 8]) * 8 + t % 8 for t in range(seq_len)]
    k = kv.k_cache.flatten(0, 1)[slots].transpose(0, 1)[None]  # [1, kvh, seq_len, d]
    v = kv.v_cache.flatten(0, 1)[slots].transpose(0, 1)[None]
    q_idx = torch.arange(seq_len - q_len, seq_len)[:, None]  # [q_len, 1] absolute positions
    kv_idx = torch.arange(seq_len)[None, :]  # [1, seq_len]
    allowed = masking.sliding_window_causal_mask_function(window)(0, 0, q_idx, kv_idx)  # [q_len, seq_len]
    additive = torch.zeros(q_len, seq_len).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    module = types.SimpleNamespace(head_dim=head_dim, num_key_value_groups=num_heads // num_kv_heads, training=False)
    hf_out, _ = gemma2.eager_attention_forward(module, query.transpose(0, 1)[None], k, v, additive,
                                               dropout=0.0, scaling=scale, softcap=cap)  # [1, q_len, h, d]
    torch.testing.assert_close(out, hf_out[0], rtol=1e-5, atol=1e-5)


# --- Triton against the reference ------------------------------------------------------------------


TRITON_OPTIONS = [(1, None), (5, None), (20, None), (40, None), (1000, None), (None, 2.0), (5, 2.0), (40, 30.0)]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("window", "cap"), TRITON_OPTIONS)
def test_triton_decode_matches_reference(window, cap, num_splits, paged_kv, assert_close):
    kv, query, scale = _decode_inputs(paged_kv, seed=5)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    expected = reference.paged_attention_decode(*args, sliding_window=window, logits_soft_cap=cap)
    actual = decode_attention(*args, num_splits=num_splits, block_n=16, sliding_window=window, logits_soft_cap=cap)
    assert_close(actual, expected)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize(("window", "cap"), TRITON_OPTIONS)
def test_triton_prefill_matches_reference(window, cap, block_m, paged_kv, assert_close):
    kv, query, qsl, scale = _prefill_inputs(paged_kv, seed=6)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    expected = reference.paged_attention_prefill(*args, sliding_window=window, logits_soft_cap=cap)
    actual = prefill_attention(*args, block_m=block_m, block_n=16, sliding_window=window, logits_soft_cap=cap)
    assert_close(actual, expected)


def test_triton_bfloat16_with_window_and_cap(paged_kv, assert_close):
    """bfloat16 through the public entry points (default launch settings), window and cap together."""
    kv, query, scale = _decode_inputs(paged_kv, torch.bfloat16, seed=7)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    options = dict(sliding_window=12, logits_soft_cap=2.0)
    assert_close(triton_ops.paged_attention_decode(*args, **options), reference.paged_attention_decode(*args, **options))
    for splits in (1, 3):
        assert_close(decode_attention(*args, num_splits=splits, block_n=16, **options),
                     reference.paged_attention_decode(*args, **options))
    kv, query, qsl, scale = _prefill_inputs(paged_kv, torch.bfloat16, seed=7)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    assert_close(triton_ops.paged_attention_prefill(*args, **options), reference.paged_attention_prefill(*args, **options))


def test_triton_soft_cap_saturates_without_overflow(paged_kv, assert_close):
    """Scores far past the cap (|s / c| up to ~100): tanh stays finite and matches the reference."""
    kv, query, scale = _decode_inputs(paged_kv, seed=8)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 40.0)
    expected = reference.paged_attention_decode(*args, logits_soft_cap=1.5)
    assert_close(decode_attention(*args, num_splits=3, block_n=16, logits_soft_cap=1.5), expected)
    kv, query, qsl, scale = _prefill_inputs(paged_kv, seed=8)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 40.0)
    expected = reference.paged_attention_prefill(*args, sliding_window=20, logits_soft_cap=1.5)
    assert_close(prefill_attention(*args, block_m=16, block_n=16, sliding_window=20, logits_soft_cap=1.5), expected)


def _poison_before(kv, first_read):
    """A copy of ``kv``'s caches with NaN in every slot of sequence ``i`` below ``first_read[i]``."""
    k_cache, v_cache = kv.k_cache.clone(), kv.v_cache.clone()
    block_size = k_cache.shape[1]
    for i, bound in enumerate(first_read):
        for t in range(bound):
            b = int(kv.block_tables[i, t // block_size])
            k_cache[b, t % block_size] = float("nan")
            v_cache[b, t % block_size] = float("nan")
    return k_cache, v_cache


def test_triton_never_reads_keys_before_the_window(paged_kv, assert_close):
    """NaN in every key/value a window hides (decode), and in every whole 16-key tile before a
    sequence's earliest window start (prefill): the kernels skip them, so the output stays finite."""
    window = 20
    kv, query, scale = _decode_inputs(paged_kv, seed=9)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale,
                                                sliding_window=window)
    k_cache, v_cache = _poison_before(kv, [max(n - window, 0) for n in DECODE["seq_lens"]])
    for splits in (1, 3):
        actual = decode_attention(query, k_cache, v_cache, kv.block_tables, kv.seq_lens, scale,
                                  num_splits=splits, block_n=16, sliding_window=window)
        assert_close(actual, expected)
    kv, query, qsl, scale = _prefill_inputs(paged_kv, seed=9)
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale,
                                                 sliding_window=window)
    first = [max(n - q - window + 1, 0) // 16 * 16 for n, q in zip(PREFILL["seq_lens"], PREFILL["q_lens"])]
    assert max(first) >= 16  # the long extend's first tile is poisoned
    k_cache, v_cache = _poison_before(kv, first)
    actual = prefill_attention(query, k_cache, v_cache, kv.block_tables, qsl, kv.seq_lens, scale,
                               block_m=16, block_n=16, sliding_window=window)
    assert_close(actual, expected)


def test_triton_decode_splits_cover_only_the_window(paged_kv, assert_close):
    """The public decode entry point sizes its splits by the window, not by the block table."""
    kv = paged_kv([3, 66], 16, 2, 32, torch.float32, seed=10, extra_width=8)
    query = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(11))
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2)
    expected = reference.paged_attention_decode(*args, sliding_window=9, logits_soft_cap=4.0)
    assert_close(triton_ops.paged_attention_decode(*args, sliding_window=9, logits_soft_cap=4.0), expected)


def test_triton_empty_context_with_window_gives_zeros(paged_kv):
    kv = paged_kv([20, 1], 8, 1, 16, torch.float32, seed=2)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32)
    query = torch.randn(2, 2, 16)
    for splits in (1, 4):
        out = decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, seq_lens, 0.3, num_splits=splits,
                               block_n=16, sliding_window=4, logits_soft_cap=5.0)
        assert torch.equal(out[1], torch.zeros(2, 16))
    ref = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, seq_lens, 0.3,
                                           sliding_window=4, logits_soft_cap=5.0)
    assert torch.equal(ref[1], torch.zeros(2, 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- validation --------------------------------------------------------------------------------------


BAD_OPTIONS = [
    ({"sliding_window": 0}, "sliding_window"),
    ({"sliding_window": -3}, "sliding_window"),
    ({"sliding_window": 4.0}, "sliding_window"),
    ({"sliding_window": True}, "sliding_window"),
    ({"sliding_window": "8"}, "sliding_window"),
    ({"logits_soft_cap": 0.0}, "logits_soft_cap"),
    ({"logits_soft_cap": -50.0}, "logits_soft_cap"),
    ({"logits_soft_cap": math.nan}, "logits_soft_cap"),
    ({"logits_soft_cap": math.inf}, "logits_soft_cap"),
    ({"logits_soft_cap": True}, "logits_soft_cap"),
    ({"logits_soft_cap": "50"}, "logits_soft_cap"),
]


@pytest.mark.parametrize("ops", [reference, triton_ops], ids=["torch", "triton"])
@pytest.mark.parametrize(("options", "name"), BAD_OPTIONS)
def test_invalid_options_are_rejected(ops, options, name):
    cache = torch.zeros(2, 8, 1, 16)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=name):
        ops.paged_attention_decode(torch.zeros(1, 2, 16), cache, cache, tables, lens, 1.0, **options)
    with pytest.raises(ValueError, match=name):
        ops.paged_attention_prefill(torch.zeros(1, 2, 16), cache, cache, tables, torch.tensor([0, 1], dtype=torch.int32),
                                    lens, 1.0, **options)


@pytest.mark.parametrize("ops", [reference, triton_ops], ids=["torch", "triton"])
def test_integer_soft_cap_and_options_are_keyword_only(ops, paged_kv):
    kv, query, scale = _decode_inputs(paged_kv, seed=12)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    torch.testing.assert_close(ops.paged_attention_decode(*args, logits_soft_cap=50),
                               ops.paged_attention_decode(*args, logits_soft_cap=50.0))
    with pytest.raises(TypeError):
        ops.paged_attention_decode(*args, 4)
