"""Triton shrink/expand (TRITON_INTERPRET=1 on the CPU) against the PyTorch reference."""

from __future__ import annotations

import inspect

import pytest
import torch

from pageant.kernels import lora as tri
from pageant.kernels import lora_reference as ref
from pageant.kernels.lora_reference import LoRAKernelMeta

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Close up to ``dtype``'s rounding, relative to the tensor's scale (bf16 rounds large sums)."""
    scale = max(1.0, float(expected.float().abs().max())) if expected.numel() else 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("name", tri.__all__[1:])
def test_triton_twins_have_the_reference_signatures(name):
    assert inspect.signature(getattr(tri, name)) == inspect.signature(getattr(ref, name))
    assert getattr(tri, name) is not getattr(ref, name)  # the sliced ones are built on the Triton kernels


def _indices(num_tokens: int, max_loras: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(-1, max_loras, (num_tokens,), generator=gen)
    if num_tokens >= 3:
        idx[0], idx[1] = -1, 0  # always some base-model rows and some adapter rows
    return idx.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens,in_features,rank,max_loras",
    [(1, 64, 8, 1), (7, 40, 4, 3), (37, 96, 16, 4), (70, 33, 20, 2), (5, 300, 16, 1), (3, 520, 8, 2)],
)
def test_shrink_expand_match_reference(dtype, num_tokens, in_features, rank, max_loras):
    gen = torch.Generator().manual_seed(num_tokens * 31 + rank)
    out_features = in_features + 24
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    a = torch.randn(max_loras, rank, in_features, generator=gen).to(dtype)
    b = torch.randn(max_loras, out_features, rank, generator=gen).to(dtype)
    idx = _indices(num_tokens, max_loras, gen)

    y_ref = ref.lora_shrink(x, a, idx, 0.5)
    y_tri = tri.lora_shrink(x, a, idx, 0.5)
    assert y_tri.dtype == torch.float32 and y_tri.shape == (num_tokens, rank)
    assert_close(y_tri, y_ref, dtype)
    assert torch.all(y_tri[idx == -1] == 0)
    # the reference itself equals the dense per-token formula
    dense = torch.stack(
        [x[t].float() @ a[i].float().T * 0.5 if i >= 0 else torch.zeros(rank) for t, i in enumerate(idx.tolist())]
    )
    assert_close(y_ref, dense, dtype)

    base = torch.randn(num_tokens, out_features, generator=gen).to(dtype)
    out_ref = ref.lora_expand(y_ref, b, idx, base.clone())
    out_tri = tri.lora_expand(y_ref, b, idx, base.clone())
    assert_close(out_tri, out_ref, dtype)
    assert torch.equal(out_tri[idx == -1], base[idx == -1])  # base-model rows untouched
    changed = idx >= 0
    assert not torch.allclose(out_ref[changed].float(), base[changed].float())


def test_expand_overwrite_and_column_offset():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(9, 8, generator=gen)
    b = torch.randn(2, 24, 8, generator=gen)
    idx = torch.tensor([1, -1, 0, 0, 1, -1, 1, 0, 0])
    base = torch.randn(9, 60, generator=gen)
    for impl in (ref, tri):
        out = impl.lora_expand(y, b, idx, base.clone(), add_inputs=False, offset=20)
        torch.testing.assert_close(out[:, :20], base[:, :20])
        torch.testing.assert_close(out[:, 44:], base[:, 44:])
        for t, i in enumerate(idx.tolist()):
            want = y[t] @ b[i].T if i >= 0 else base[t, 20:44]
            torch.testing.assert_close(out[t, 20:44], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_qkv_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    num_tokens, hidden, rank, max_loras = 21, 64, 8, 3
    slices = [64, 32, 32]  # q, k, v of a GQA model
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    a = [torch.randn(max_loras, rank, hidden, generator=gen).to(dtype) for _ in slices]
    b = [torch.randn(max_loras, n, rank, generator=gen).to(dtype) for n in slices]
    idx = _indices(num_tokens, max_loras, gen)
    meta = LoRAKernelMeta.build(idx, max_loras)
    y_ref = ref.lora_shrink_sliced(x, a, idx, 1.0, meta=meta)
    y_tri = tri.lora_shrink_sliced(x, a, idx, 1.0, meta=meta)
    assert_close(y_tri, y_ref, dtype)
    base = torch.randn(num_tokens, sum(slices), generator=gen).to(dtype)
    out_ref = ref.lora_expand_sliced(y_ref, b, idx, base.clone(), meta=meta)
    out_tri = tri.lora_expand_sliced(y_ref, b, idx, base.clone(), meta=meta)
    assert_close(out_tri, out_ref, dtype)
    # slice k lands in columns 64:96 only
    k_only = ref.lora_expand(y_ref[1], b[1], idx, torch.zeros(num_tokens, 32, dtype=dtype))
    assert_close(out_ref[:, 64:96].float() - base[:, 64:96].float(), k_only.float(), dtype)


def test_meta_groups_tokens_by_slot():
    idx = torch.tensor([2, -1, 0, 2, 0, -1, 1])
    meta = LoRAKernelMeta.build(idx, 4)
    assert meta.num_tokens_per_slot.tolist() == [2, 2, 1, 2, 0]
    assert meta.slot_start.tolist() == [0, 2, 4, 5, 7]
    assert meta.sorted_token_indices.tolist() == [1, 5, 2, 4, 6, 0, 3]


def test_bad_inputs_raise():
    x = torch.randn(3, 16)
    a = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="token_lora_indices"):
        ref.lora_shrink(x, a, torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match="token_lora_indices"):
        tri.lora_shrink(x, a, torch.tensor([0, -2, -1]))
    for impl in (ref, tri):  # one shape check serves both
        with pytest.raises(ValueError, match="x must be"):
            impl.lora_shrink(torch.randn(3, 8), a, torch.tensor([0, 1, -1]))
        with pytest.raises(ValueError, match="cannot hold"):
            impl.lora_expand(torch.randn(3, 4), torch.randn(2, 16, 4), torch.tensor([0, 1, -1]), torch.zeros(3, 8))
        with pytest.raises(ValueError, match="y must be"):
            impl.lora_expand(torch.randn(3, 5), torch.randn(2, 16, 4), torch.tensor([0, 1, -1]), torch.zeros(3, 16))


def test_empty_batch_and_all_base():
    a = torch.randn(2, 4, 16)
    b = torch.randn(2, 16, 4)
    for impl in (ref, tri):
        assert impl.lora_shrink(torch.randn(0, 16), a, torch.zeros(0, dtype=torch.int32)).shape == (0, 4)
        x = torch.randn(5, 16)
        idx = torch.full((5,), -1)
        y = impl.lora_shrink(x, a, idx)
        assert torch.equal(y, torch.zeros(5, 4))
        base = torch.randn(5, 16)
        assert torch.equal(impl.lora_expand(y, b, idx, base.clone()), base)


def test_split_k_is_exercised():
    """The wide cases above run shrink with K split over several programs (atomic partial sums)."""
    assert tri._split_k(1, 3, torch.device("cpu")) == 3  # (5, 300, 16, 1): 3 chunks of 128
    assert tri._split_k(2, 5, torch.device("cpu")) == 4  # (3, 520, 8, 2)
    assert tri._split_k(64, 40, torch.device("cpu")) == 1  # enough tiles: no atomics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_token_on_one_adapter(dtype):
    """The reference's fast path (one slot covers the batch: no gather/scatter) and the kernels."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 48, generator=gen).to(dtype)
    a = torch.randn(3, 8, 48, generator=gen).to(dtype)
    b = torch.randn(3, 40, 8, generator=gen).to(dtype)
    idx = torch.full((6,), 2, dtype=torch.int32)
    want_y = x.float() @ a[2].float().T * 2.0
    base = torch.randn(6, 50, generator=gen).to(dtype)
    want = base.clone()
    want[:, 5:45] = (base[:, 5:45].float() + want_y.to(dtype).float() @ b[2].float().T).to(dtype)
    for impl in (ref, tri):
        y = impl.lora_shrink(x, a, idx, 2.0)
        assert_close(y, want_y, dtype)
        assert_close(impl.lora_expand(want_y, b, idx, base.clone(), offset=5), want, dtype)
        overwritten = impl.lora_expand(want_y, b, idx, base.clone(), add_inputs=False, offset=5)
        assert_close(overwritten[:, 5:45], (want_y.to(dtype).float() @ b[2].float().T), dtype)
