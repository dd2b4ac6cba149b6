"""Norms, activations, the paged ``Attention`` layer and ``models.utils`` against references.

- norms against transformers' ``LlamaRMSNorm`` / ``Gemma2RMSNorm`` and ``torch.nn.LayerNorm``;
- activations against ``transformers.activations.ACT2FN``;
- ``Attention`` over a paged KV cache against dense per-sequence attention written out here;
- ``models.utils``: the fused-qkv re-layouts and the stacked weight loading.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pageant.engine.attention import AttentionMetadata
from pageant.engine.layers.activation import ACTIVATIONS, ActAndMul, GeluAndMul, SiluAndMul, get_act_fn
from pageant.engine.layers.attention import Attention
from pageant.engine.layers.layernorm import GemmaRMSNorm, LayerNorm, RMSNorm
from pageant.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pageant.engine.layers.vocab_embedding import VocabParallelEmbedding
from pageant.engine.models.utils import SKIP, expected_keys, load_stacked, per_head_to_blocks
from pageant.kernels import get_ops

TORCH_OPS = get_ops("torch")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)



# -------------------------------------------------------------------------------------------- norms


def _check_norm(g, ours, ref, w, dtype, with_residual, n, size, scale):
    """Same weight ``w`` in both norms; outputs (and the residual sum) bit-equal in ``dtype``."""
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    ours.to(dtype), ref.to(dtype)  # (modules convert in place)
    x, res = randn(g, n, size, dtype=dtype) * scale, randn(g, n, size, dtype=dtype)
    with torch.no_grad():
        if with_residual:
            out, new_res = ours(x, res)
            assert torch.equal(new_res, x + res)
            assert torch.equal(out, ref(x + res))
        else:
            out = ours(x)
            assert out.dtype == dtype and torch.equal(out, ref(x))
    return x, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_llama(dtype, with_residual):
    g = gen(1)
    size, n, eps = 48, 7, 1e-5
    ours = RMSNorm(size, eps, TORCH_OPS)
    ref = LlamaRMSNorm(size, eps=eps)
    _check_norm(g, ours, ref, randn(g, size) * 0.5 + 1, dtype, with_residual, n, size, scale=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_rms_norm_equals_gemma2(dtype, with_residual):
    g = gen(2)
    size, n, eps = 40, 6, 1e-6
    ours, ref = GemmaRMSNorm(size, eps), Gemma2RMSNorm(size, eps=eps)
    w = randn(g, size) * 0.3  # stored as w, applied as 1 + w
    x, res = _check_norm(g, ours, ref, w, dtype, with_residual, n, size, scale=2)
    # the (1 + w) form really differs from Llama's w * x
    llama = LlamaRMSNorm(size, eps=eps).to(dtype)
    with torch.no_grad():
        llama.weight.copy_(w.to(dtype))
        assert not torch.equal(ours(x) if not with_residual else ours(x, res)[0], llama(x if not with_residual else x + res))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_equals_torch(bias):
    g = gen(4)
    size, eps = 20, 1e-5
    ours, ref = LayerNorm(size, eps, bias=bias), nn.LayerNorm(size, eps=eps, bias=bias)
    w, b = randn(g, size), randn(g, size)
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
        if bias:
            ours.bias.copy_(b)
            ref.bias.copy_(b)
    assert (ours.bias is None) == (not bias)
    x = randn(g, 5, size) * 4 + 1
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


# -------------------------------------------------------------------------------------- activations

# names whose Hugging Face implementation is a different float32 formula (same function):
# gelu_fast is 0.5x(1 + tanh(0.7978845608 x (1 + 0.044715 x^2))); ours is gelu_new's spelling
_NOT_BITWISE = {"gelu_fast"}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_equals_act2fn(name):
    g = gen(sorted(ACTIVATIONS).index(name))
    x = randn(g, 64, 33) * 4
    ours, ref = get_act_fn(name)(x), ACT2FN[name](x)
    if name in _NOT_BITWISE:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("make,name", [(SiluAndMul, "silu"), (GeluAndMul, "gelu"),
                                       (lambda: GeluAndMul("tanh"), "gelu_pytorch_tanh"),
                                       (lambda: ActAndMul("gelu_new"), "gelu_new")])
def test_act_and_mul_splits_gate_up(make, name):
    g = gen(9)
    d = 13
    gate, up = randn(g, 5, d) * 3, randn(g, 5, d)
    x = torch.cat([gate, up], dim=-1)
    out = make()(x)
    assert out.shape == (5, d)
    # bit for bit against HF's act on the same (strided) half; PyTorch's vectorised kernels for
    # contiguous inputs may differ in the last ulp, hence the tight allclose against contiguous gate
    assert torch.equal(out, ACT2FN[name](x[:, :d]) * x[:, d:])
    torch.testing.assert_close(out, ACT2FN[name](gate) * up, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, ACT2FN[name](up) * gate)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unsupported activation"):
        get_act_fn("mystery")
    with pytest.raises(ValueError, match="unsupported activation"):
        ActAndMul("gelu_mystery")


# ----------------------------------------------------------------------------------------- attention

BLOCK = 4


def dense_attention(q, k, v, q_pos, scale, window, cap):
    """q [m, h, d], k/v [t, kvh, d] (positions 0..t-1), q_pos [m] -> [m, h, d]; float64, written out."""
    h, kvh = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(h // kvh, dim=1)
    v = v.double().repeat_interleave(h // kvh, dim=1)
    scores = torch.einsum("mhd,thd->hmt", q.double(), k) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    kp = torch.arange(k.shape[0])
    allowed = kp[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= kp[None, :] > q_pos[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hmt,thd->mhd", torch.softmax(scores, dim=-1), v)


# (cached tokens before this step, new tokens this step); decodes first
SEQS = {"mixed": [(6, 1), (9, 1), (0, 6), (5, 4)], "decode": [(6, 1), (13, 1), (2, 1)],
        "prefill": [(0, 7), (5, 4), (8, 1)]}


@pytest.mark.parametrize("batch", sorted(SEQS))
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 5.0), (5, 2.0)])
def test_attention_layer_paged_equals_dense(batch, num_kv_heads, window, cap):
    g = gen(num_kv_heads + (window or 0) * 3 + int(cap or 0) * 7 + len(batch))
    num_heads, d = 4, 8
    scale = 0.7 if cap is not None else d ** -0.5  # big scores make the soft cap matter
    seqs = SEQS[batch]
    num_decode = sum(1 for _, new in seqs if new == 1) if batch != "prefill" else 0
    max_blocks = max(-(-(c + n) // BLOCK) for c, n in seqs)
    num_blocks = sum(-(-(c + n) // BLOCK) for c, n in seqs) + 3
    kv_cache = randn(g, 2, num_blocks, BLOCK, num_kv_heads, d)  # garbage everywhere not written
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, full_k, full_v, slots, qs, ks, vs = [], [], [], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        nb = -(-total // BLOCK)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks + [blocks[0]] * (max_blocks - nb))  # padding: a valid id, never read
        k_all, v_all = randn(g, total, num_kv_heads, d), randn(g, total, num_kv_heads, d)
        full_k.append(k_all)
        full_v.append(v_all)
        for p in range(total):
            slot = blocks[p // BLOCK] * BLOCK + p % BLOCK
            if p < cached:  # the cached prefix is already in the cache
                kv_cache[0].view(-1, num_kv_heads, d)[slot] = k_all[p]
                kv_cache[1].view(-1, num_kv_heads, d)[slot] = v_all[p]
            else:
                slots.append(slot)
        qs.append(randn(g, new, num_heads, d))
        ks.append(k_all[cached:])
        vs.append(v_all[cached:])
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    lens = [c + n for c, n in seqs]
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        num_decode_seqs=num_decode,
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens),
    )
    before = kv_cache.clone()
    layer = Attention(num_heads, d, scale, num_kv_heads, TORCH_OPS, sliding_window=window, logits_soft_cap=cap)
    out = layer(q.reshape(len(q), -1), k.reshape(len(k), -1), v.reshape(len(v), -1), kv_cache, md)
    assert out.shape == (len(q), num_heads * d)

    for i, (cached, new) in enumerate(seqs):
        q_pos = torch.arange(cached, cached + new)
        ref = dense_attention(qs[i], full_k[i], full_v[i], q_pos, scale, window, cap)
        got = out[qsl[i] : qsl[i + 1]].reshape(new, num_heads, d)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)

    # the step's k/v landed in their slots; nothing else in the cache changed
    slot_t = torch.tensor(slots)
    assert torch.equal(kv_cache[0].view(-1, num_kv_heads, d)[slot_t], k)
    assert torch.equal(kv_cache[1].view(-1, num_kv_heads, d)[slot_t], v)
    untouched = torch.ones(num_blocks * BLOCK, dtype=torch.bool)
    untouched[slot_t] = False
    for j in range(2):
        assert torch.equal(kv_cache[j].view(-1, num_kv_heads, d)[untouched],
                           before[j].view(-1, num_kv_heads, d)[untouched])


def test_attention_options_matter():
    """The window and the cap change the result (so the dense comparison above checks them)."""
    g = gen(0)
    q, k, v = randn(g, 6, 2, 4) * 3, randn(g, 6, 2, 4), randn(g, 6, 2, 4)
    pos = torch.arange(6)
    plain = dense_attention(q, k, v, pos, 1.0, None, None)
    assert not torch.allclose(plain, dense_attention(q, k, v, pos, 1.0, 3, None))
    assert not torch.allclose(plain, dense_attention(q, k, v, pos, 1.0, None, 1.0))
    with pytest.raises(ValueError, match="multiple"):
        Attention(4, 8, 1.0, 3, TORCH_OPS)


# --------------------------------------------------------------------------------------- models.utils


@pytest.mark.parametrize("bias", [False, True])
def test_per_head_to_blocks_gpt_neox(bias):
    g = gen(1)
    heads, d, hidden = 3, 4, 5
    t = randn(g, heads * 3 * d) if bias else randn(g, heads * 3 * d, hidden)  # rows [h][3][d]
    out = per_head_to_blocks(t, heads, (1, 1, 1), d)
    rest = t.shape[1:]
    expected = t.view(heads, 3, d, *rest).permute(1, 0, 2, *range(3, 3 + len(rest))).reshape(3 * heads * d, *rest)
    assert torch.equal(out, expected)
    # and row by row: part p of head h sits at block p, head h
    for h in range(heads):
        for p in range(3):
            assert torch.equal(out[(p * heads + h) * d : (p * heads + h + 1) * d],
                               t[(h * 3 + p) * d : (h * 3 + p + 1) * d])


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 1), (4, 4)])
def test_per_head_to_blocks_falcon_grouped(heads, kv):
    """Falcon's new layout: per KV group, its g = heads / kv query heads, then its k head, then its v head."""
    g = gen(heads + kv)
    d, hidden, grp = 3, 6, heads // kv
    t = randn(g, kv * (grp + 2) * d, hidden)
    out = per_head_to_blocks(t, kv, (grp, 1, 1), d)
    rows = t.view(kv, grp + 2, d, hidden)
    q = torch.cat([rows[i, j] for i in range(kv) for j in range(grp)])
    k = torch.cat([rows[i, grp] for i in range(kv)])
    v = torch.cat([rows[i, grp + 1] for i in range(kv)])
    assert torch.equal(out, torch.cat([q, k, v]))
    # fed to a QKVParallelLinear as a fused tensor, query head j uses KV head j // grp
    layer = QKVParallelLinear(hidden, d, heads, kv)
    layer.weight_loader(layer.weight, out)
    assert torch.equal(layer.weight[: heads * d], q)


class _Block(nn.Module):
    def __init__(self, hidden=8, d=4, heads=2, kv=1, inter=6):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(hidden, d, heads, kv, bias=True)
        self.self_attn.o_proj = RowParallelLinear(heads * d, hidden)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter])
        self.mlp.down_proj = RowParallelLinear(inter, hidden)
        self.input_layernorm = RMSNorm(hidden, 1e-6, TORCH_OPS)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(11, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])


STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


def _checkpoint(g):
    ckpt = {"embed_tokens.weight": randn(g, 11, 8)}
    for i in range(2):
        p = f"layers.{i}."
        for name, shape in (("self_attn.q_proj.weight", (8, 8)), ("self_attn.k_proj.weight", (4, 8)),
                            ("self_attn.v_proj.weight", (4, 8)), ("self_attn.q_proj.bias", (8,)),
                            ("self_attn.k_proj.bias", (4,)), ("self_attn.v_proj.bias", (4,)),
                            ("self_attn.o_proj.weight", (8, 8)), ("mlp.gate_proj.weight", (6, 8)),
                            ("mlp.up_proj.weight", (6, 8)), ("mlp.down_proj.weight", (8, 6)),
                            ("input_layernorm.weight", (8,))):
            ckpt[p + name] = randn(g, *shape)
    return ckpt


def test_load_stacked_and_expected_keys():
    g = gen(2)
    model, ckpt = _Model(), _checkpoint(g)
    keys = expected_keys(model)
    for i in range(2):
        p = f"layers.{i}."
        assert {p + "self_attn.qkv_proj.weight:q", p + "self_attn.qkv_proj.weight:k",
                p + "self_attn.qkv_proj.weight:v", p + "self_attn.qkv_proj.bias:v",
                p + "mlp.gate_up_proj.weight:0", p + "mlp.gate_up_proj.weight:1",
                p + "self_attn.o_proj.weight", p + "input_layernorm.weight"} <= keys
        assert p + "self_attn.qkv_proj.weight" not in keys
    assert len(keys) == 1 + 2 * (6 + 2 + 1 + 1 + 1)
    assert expected_keys(model, skip=["embed_tokens.weight"]) == keys - {"embed_tokens.weight"}

    extra = [("layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(2))]  # always skipped
    loaded = load_stacked(model, list(ckpt.items()) + extra, STACKED)
    assert loaded == keys
    for i in range(2):
        p = f"layers.{i}."
        attn, mlp = model.layers[i].self_attn, model.layers[i].mlp
        assert torch.equal(attn.qkv_proj.weight, torch.cat([ckpt[p + f"self_attn.{s}_proj.weight"] for s in "qkv"]))
        assert torch.equal(attn.qkv_proj.bias, torch.cat([ckpt[p + f"self_attn.{s}_proj.bias"] for s in "qkv"]))
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([ckpt[p + "mlp.gate_proj.weight"],
                                                               ckpt[p + "mlp.up_proj.weight"]]))
        assert torch.equal(attn.o_proj.weight, ckpt[p + "self_attn.o_proj.weight"])
        assert torch.equal(model.layers[i].input_layernorm.weight, ckpt[p + "input_layernorm.weight"])

    # a partial checkpoint names what is missing through the keys
    partial = {k: t for k, t in ckpt.items() if k != "layers.1.self_attn.v_proj.weight"}
    assert keys - load_stacked(_Model(), partial.items(), STACKED) == {"layers.1.self_attn.qkv_proj.weight:v"}

    # a fused checkpoint tensor (shard None) fills every shard key
    fused = _Model()
    got = load_stacked(fused, [("layers.0.self_attn.qkv_proj.weight", model.layers[0].self_attn.qkv_proj.weight)])
    assert got == {f"layers.0.self_attn.qkv_proj.weight:{s}" for s in "qkv"}
    assert torch.equal(fused.layers[0].self_attn.qkv_proj.weight, model.layers[0].self_attn.qkv_proj.weight)

    # rename hooks: SKIP, or a new name
    def rename(name, tensor):
        if name.startswith("lm_head."):
            return SKIP
        return name.replace("model.", "", 1), tensor

    renamed = [("model." + k, t) for k, t in ckpt.items()] + [("lm_head.weight", torch.zeros(11, 8))]
    assert load_stacked(_Model(), renamed, STACKED, rename) == keys


def test_load_stacked_errors_name_the_weight():
    g = gen(3)
    with pytest.raises(ValueError, match=r"unexpected weight 'layers.0.self_attn.mystery.weight'"):
        load_stacked(_Model(), [("layers.0.self_attn.mystery.weight", torch.zeros(8, 8))], STACKED)
    with pytest.raises(ValueError, match=r"unexpected weight 'layers.5.mlp.gate_proj.weight'"):
        load_stacked(_Model(), [("layers.5.mlp.gate_proj.weight", torch.zeros(6, 8))], STACKED)
    with pytest.raises(ValueError, match=r"weight 'layers.1.self_attn.k_proj.weight'.*does not fit"):
        load_stacked(_Model(), [("layers.1.self_attn.k_proj.weight", randn(g, 5, 8))], STACKED)
    with pytest.raises(ValueError, match=r"weight 'layers.0.input_layernorm.weight'"):
        load_stacked(_Model(), [("layers.0.input_layernorm.weight", randn(g, 9))], STACKED)
