"""Linear and vocabulary layers of ``pageant.engine.layers`` against independent references.

One rank against ``F.linear`` / ``F.embedding``; the sharding rules with a fake two-rank
``ParallelState`` (weight loaders, plus forwards whose collectives run here), checked with explicit
row/column arithmetic and by concatenating the ranks' shards back into the full weight.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pageant.engine.layers.parallel import ParallelState
from pageant.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def two_ranks():
    """Fake two-rank states: enough for shapes and weight loaders (no collective is called)."""
    group = object()
    return [ParallelState(tp_rank=r, tp_size=2, group=group) for r in range(2)]


# ---------------------------------------------------------------------------------------------- linear


def load(layer: nn.Module, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    layer.weight_loader(param, tensor) if shard_id is None else layer.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_one_rank_equals_f_linear(cls, bias, seed):
    g = gen(seed)
    in_f, out_f, n = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
    layer = cls(in_f, out_f, bias=bias, parallel=ParallelState())
    w, b = randn(g, out_f, in_f), randn(g, out_f)
    load(layer, "weight", w)
    if bias:
        load(layer, "bias", b)
    else:
        assert layer.bias is None
    x = randn(g, n, in_f)
    assert torch.equal(layer.weight, w) and (layer.in_features, layer.out_features) == (in_f, out_f)
    torch.testing.assert_close(layer(x), F.linear(x, w, b if bias else None), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        load(layer, "weight", randn(g, out_f + 1, in_f))
    with pytest.raises(ValueError, match="does not fit"):
        load(layer, "weight", randn(g, out_f, in_f + 1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_one_rank_shards_and_fused(heads, kv_heads, bias):
    g = gen(heads * 10 + kv_heads)
    hidden, d = 24, 8
    q, k, v = randn(g, heads * d, hidden), randn(g, kv_heads * d, hidden), randn(g, kv_heads * d, hidden)
    qb, kb, vb = randn(g, heads * d), randn(g, kv_heads * d), randn(g, kv_heads * d)
    layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=bias)
    assert (layer.q_size, layer.kv_size) == (heads * d, kv_heads * d)
    assert layer.weight.shape == ((heads + 2 * kv_heads) * d, hidden)
    assert layer.shard_ids == ("q", "k", "v")
    for sid, t in (("v", v), ("q", q), ("k", k)):  # any order
        load(layer, "weight", t, sid)
    if bias:
        for sid, t in (("k", kb), ("v", vb), ("q", qb)):
            load(layer, "bias", t, sid)
    full, full_b = torch.cat([q, k, v]), torch.cat([qb, kb, vb])
    assert torch.equal(layer.weight, full)
    if bias:
        assert torch.equal(layer.bias, full_b)
    x = randn(g, 5, hidden)
    torch.testing.assert_close(layer(x), F.linear(x, full, full_b if bias else None), rtol=1e-6, atol=1e-6)

    fused = QKVParallelLinear(hidden, d, heads, kv_heads, bias=bias)
    load(fused, "weight", full)  # shard_id None: already [q | k | v]
    assert torch.equal(fused.weight, full)
    if bias:
        load(fused, "bias", full_b)
        assert torch.equal(fused.bias, full_b)

    with pytest.raises(ValueError):
        load(layer, "weight", randn(g, heads * d + 1, hidden), "q")
    with pytest.raises(ValueError):
        load(layer, "weight", randn(g, kv_heads * d, hidden + 1), "k")
    with pytest.raises(ValueError, match="fused qkv"):
        load(layer, "weight", randn(g, full.shape[0] + d, hidden))
    with pytest.raises(ValueError, match="unknown shard"):
        load(layer, "weight", q, "o")


@pytest.mark.parametrize("sizes", [(16, 16), (8, 12), (4, 6, 10)])
def test_merged_column_one_rank_shards_and_fused(sizes):
    g = gen(sum(sizes))
    hidden = 10
    parts = [randn(g, s, hidden) for s in sizes]
    biases = [randn(g, s) for s in sizes]
    layer = MergedColumnParallelLinear(hidden, sizes, bias=True)
    assert layer.shard_ids == tuple(range(len(sizes)))
    for i in reversed(range(len(sizes))):
        load(layer, "weight", parts[i], i)
        load(layer, "bias", biases[i], i)
    assert torch.equal(layer.weight, torch.cat(parts)) and torch.equal(layer.bias, torch.cat(biases))
    x = randn(g, 3, hidden)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat(parts), torch.cat(biases)), rtol=1e-6, atol=1e-6)
    fused = MergedColumnParallelLinear(hidden, sizes, bias=False)
    load(fused, "weight", torch.cat(parts))
    assert torch.equal(fused.weight, torch.cat(parts))
    with pytest.raises(ValueError):
        load(layer, "weight", randn(g, sizes[0] + 1, hidden), 0)
    with pytest.raises(ValueError, match="unknown shard"):
        load(layer, "weight", parts[0], len(sizes))


def test_parallel_state_validation():
    with pytest.raises(ValueError, match="process group"):
        ParallelState(tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="tp_rank"):
        ParallelState(tp_rank=2, tp_size=2, group=object())
    with pytest.raises(ValueError, match="tp_size"):
        ParallelState(tp_size=0)
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(4, 5, parallel=two_ranks()[0])
    with pytest.raises(ValueError, match="not divisible"):
        RowParallelLinear(5, 4, parallel=two_ranks()[0])
    with pytest.raises(ValueError, match="not divisible"):
        QKVParallelLinear(8, 4, 3, 1, parallel=two_ranks()[0])  # 3 heads on 2 ranks


def test_column_and_row_two_ranks():
    g = gen(5)
    in_f, out_f = 6, 10
    w, b = randn(g, out_f, in_f), randn(g, out_f)
    col_w, col_b, row_w, row_b = [], [], [], []
    for r, ps in enumerate(two_ranks()):
        col = ColumnParallelLinear(in_f, out_f, bias=True, parallel=ps)
        assert col.weight.shape == (5, in_f) and col.bias.shape == (5,)
        load(col, "weight", w)
        load(col, "bias", b)
        assert torch.equal(col.weight, w[5 * r : 5 * r + 5]) and torch.equal(col.bias, b[5 * r : 5 * r + 5])
        col_w.append(col.weight.clone())
        col_b.append(col.bias.clone())

        wt = w.T.contiguous()  # [in=10, out=6] for a row-parallel layer 10 -> 6
        row = RowParallelLinear(out_f, in_f, bias=True, parallel=ps)
        assert row.weight.shape == (in_f, 5) and row.bias.shape == (in_f,)  # the bias is whole
        load(row, "weight", wt)
        load(row, "bias", b[:in_f])
        assert torch.equal(row.weight, wt[:, 5 * r : 5 * r + 5]) and torch.equal(row.bias, b[:in_f])
        row_w.append(row.weight.clone())
        row_b.append(row.bias.clone())
        with pytest.raises(ValueError):
            load(row, "bias", b[: in_f - 1])
    assert torch.equal(torch.cat(col_w), w) and torch.equal(torch.cat(col_b), b)
    assert torch.equal(torch.cat(row_w, dim=1), w.T)
    assert torch.equal(row_b[0], row_b[1])
    # the math the shards stand for: column outputs concatenate, row partial sums add up
    x = randn(g, 3, in_f)
    torch.testing.assert_close(torch.cat([F.linear(x, cw, cb) for cw, cb in zip(col_w, col_b)], dim=-1),
                               F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    xr = randn(g, 3, out_f)
    partial = sum(F.linear(xr[:, 5 * r : 5 * r + 5], rw) for r, rw in enumerate(row_w))
    torch.testing.assert_close(partial + row_b[0], F.linear(xr, w.T, b[:in_f]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1), (2, 1)])
def test_qkv_two_ranks_split_heads(heads, kv_heads):
    """Rank r holds query heads [r*h/2, (r+1)*h/2) and KV heads [r*kv/2, ...); with one KV head per
    fewer-than-ranks (kv < tp) each rank holds a replica of KV head r // (tp / kv)."""
    g = gen(heads + 7 * kv_heads)
    hidden, d, tp = 12, 4, 2
    q, k, v = randn(g, heads * d, hidden), randn(g, kv_heads * d, hidden), randn(g, kv_heads * d, hidden)
    qb, kb, vb = randn(g, heads * d), randn(g, kv_heads * d), randn(g, kv_heads * d)
    hq = heads // tp
    hkv = max(1, kv_heads // tp)
    got_q, got_k = [], []
    for r, ps in enumerate(two_ranks()):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=True, parallel=ps)
        assert (layer.num_heads, layer.num_kv_heads) == (hq, hkv)
        assert layer.num_kv_head_replicas == (tp // kv_heads if kv_heads < tp else 1)
        assert layer.weight.shape == ((hq + 2 * hkv) * d, hidden)
        for sid, t, tb in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            load(layer, "weight", t, sid)
            load(layer, "bias", tb, sid)
        kv_head0 = r * hkv if kv_heads >= tp else r // (tp // kv_heads)
        q_rows = slice(r * hq * d, (r + 1) * hq * d)
        kv_rows = slice(kv_head0 * d, (kv_head0 + hkv) * d)
        expected = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])
        assert torch.equal(layer.weight, expected)
        assert torch.equal(layer.bias, torch.cat([qb[q_rows], kb[kv_rows], vb[kv_rows]]))
        # a fused [q | k | v] checkpoint tensor lands the same rows
        fused = QKVParallelLinear(hidden, d, heads, kv_heads, parallel=ps)
        load(fused, "weight", torch.cat([q, k, v]))
        assert torch.equal(fused.weight, expected)
        got_q.append(layer.weight[: hq * d])
        got_k.append(layer.weight[hq * d : (hq + hkv) * d])
    assert torch.equal(torch.cat(got_q), q)  # the ranks' query heads make up the whole projection
    if kv_heads >= tp:
        assert torch.equal(torch.cat(got_k), k)
    else:
        assert all(torch.equal(gk, k[r // (tp // kv_heads) * d : (r // (tp // kv_heads) + 1) * d])
                   for r, gk in enumerate(got_k))


def test_merged_column_two_ranks():
    g = gen(11)
    hidden, inter = 6, 8
    gate, up = randn(g, inter, hidden), randn(g, inter, hidden)
    shards = []
    for r, ps in enumerate(two_ranks()):
        layer = MergedColumnParallelLinear(hidden, [inter, inter], parallel=ps)
        assert layer.weight.shape == (inter, hidden)
        load(layer, "weight", up, 1)
        load(layer, "weight", gate, 0)
        half = slice(r * inter // 2, (r + 1) * inter // 2)
        assert torch.equal(layer.weight, torch.cat([gate[half], up[half]]))
        fused = MergedColumnParallelLinear(hidden, [inter, inter], parallel=ps)
        load(fused, "weight", torch.cat([gate, up]))
        assert torch.equal(fused.weight, layer.weight)
        shards.append(layer.weight)
    # concatenating the ranks' gate halves (and up halves) gives the full projections back
    assert torch.equal(torch.cat([s[: inter // 2] for s in shards]), gate)
    assert torch.equal(torch.cat([s[inter // 2 :] for s in shards]), up)


# ---------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_and_head_one_rank(seed):
    g = gen(seed)
    vocab, dim, n = int(torch.randint(5, 50, (1,), generator=g)), 12, 9
    w, b = randn(g, vocab, dim), randn(g, vocab)
    emb = VocabParallelEmbedding(vocab, dim)
    emb.weight_loader(emb.weight, w)
    ids = torch.randint(0, vocab, (n,), generator=g)
    assert torch.equal(emb(ids), F.embedding(ids, w))
    head = ParallelLMHead(vocab, dim, bias=True)
    w2 = randn(g, vocab, dim)
    head.weight_loader(head.weight, w2)
    head.weight_loader(head.bias, b)
    h = randn(g, n, dim)
    logits = head(h)
    assert logits.shape == (n, vocab)
    torch.testing.assert_close(logits, F.linear(h, w2, b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        emb.weight_loader(emb.weight, randn(g, vocab + 1, dim))
    with pytest.raises(ValueError):
        emb.weight_loader(emb.weight, randn(g, vocab, dim + 1))


def test_tied_head_shares_the_embedding_weight():
    g = gen(3)
    vocab, dim = 17, 8
    emb, head = VocabParallelEmbedding(vocab, dim), ParallelLMHead(vocab, dim)
    w = randn(g, vocab, dim)
    emb.weight_loader(emb.weight, w)
    head.tie_weights(emb)
    assert head.weight is emb.weight
    h = randn(g, 4, dim)
    torch.testing.assert_close(head(h), F.linear(h, w), rtol=1e-6, atol=1e-6)
    w_new = randn(g, vocab, dim)
    emb.weight_loader(emb.weight, w_new)  # loading the embedding moves the head with it
    torch.testing.assert_close(head(h), F.linear(h, w_new), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab", [10, 11])
def test_vocab_two_ranks_pick_rows_and_pad(vocab):
    g = gen(vocab)
    dim = 4
    w, b = randn(g, vocab, dim), randn(g, vocab)
    per = -(-vocab // 2)
    shards = []
    for r, ps in enumerate(two_ranks()):
        emb = VocabParallelEmbedding(vocab, dim, parallel=ps)
        assert emb.num_embeddings_per_partition == per and emb.vocab_start == r * per
        emb.weight.data.fill_(7.0)  # stale memory: the loader must zero the padding rows itself
        emb.weight_loader(emb.weight, w)
        real = min(vocab, (r + 1) * per) - r * per
        assert torch.equal(emb.weight[:real], w[r * per : r * per + real])
        assert torch.all(emb.weight[real:] == 0)  # padding rows (vocab not divisible by tp) are zero
        shards.append(emb.weight)
        head = ParallelLMHead(vocab, dim, bias=True, parallel=ps)
        head.weight.data.fill_(7.0)
        head.bias.data.fill_(7.0)
        head.weight_loader(head.weight, w)
        head.weight_loader(head.bias, b)
        assert torch.equal(head.weight, emb.weight)
        assert torch.equal(head.bias[:real], b[r * per : r * per + real]) and torch.all(head.bias[real:] == 0)
    full = torch.cat(shards)
    assert full.shape == (2 * per, dim)
    assert torch.equal(full[:vocab], w) and torch.all(full[vocab:] == 0)
    assert (vocab % 2 == 1) == (full.shape[0] > vocab)


class _CollectLater(ParallelState):
    """A two-rank state whose collectives are the identity: each rank's forward returns its own
    partial result, and the test does the reduction (no process group is involved)."""

    def all_reduce(self, x):
        return x

    def all_gather_last_dim(self, x):
        return x


def test_two_rank_forwards_add_up_with_the_reduction_done_here():
    g = gen(12)
    vocab, dim, n = 11, 6, 9
    group = object()
    ranks = [_CollectLater(tp_rank=r, tp_size=2, group=group) for r in range(2)]
    w_emb = randn(g, vocab, dim)
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[0], ids[1] = 0, vocab - 1  # both ends of the vocabulary
    parts = []
    for ps in ranks:
        emb = VocabParallelEmbedding(vocab, dim, parallel=ps)
        emb.weight_loader(emb.weight, w_emb)
        out = emb(ids)
        mine = (ids >= emb.vocab_start) & (ids < emb.vocab_start + emb.num_embeddings_per_partition)
        assert torch.all(out[~mine] == 0)  # ids of the other rank's rows contribute nothing here
        parts.append(out)
    assert torch.equal(parts[0] + parts[1], F.embedding(ids, w_emb))

    w, b = randn(g, 8, 10), randn(g, 8)  # Row: 10 -> 8 split on the input features
    x = randn(g, 3, 10)
    outs = []
    for r, ps in enumerate(ranks):
        row = RowParallelLinear(10, 8, bias=True, parallel=ps)
        row.weight_loader(row.weight, w)
        row.weight_loader(row.bias, b)
        outs.append(row(x[:, 5 * r : 5 * r + 5]) - b)  # the bias is added once, after the reduction
    torch.testing.assert_close(outs[0] + outs[1] + b, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
