"""CUDA-graph bucketing and padding, the KV-budget arithmetic and the dummy-weight loader, on the
CPU: the padded decode path runs eagerly here and must match the unpadded step exactly."""

import copy

import pytest
import torch

from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig
from pageant.engine.cuda_graph import DecodeBuffers, DecodeGraphs, capture_sizes, padded_size
from pageant.engine.loader import build_dummy_model, load_model
from pageant.engine.memory import MemoryProfile, kv_cache_budget_bytes, num_kv_blocks_for_budget
from pageant.kernels import reference


def test_capture_sizes_and_padding():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(50) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 50]
    sizes = capture_sizes(64)
    assert [padded_size(n, sizes) for n in (1, 3, 8, 9, 17, 63, 64)] == [1, 4, 8, 16, 24, 64, 64]
    assert padded_size(65, sizes) is None
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_buffers_fill_pads_rows():
    buf = DecodeBuffers.allocate(8, 5, torch.device("cpu"))
    buf.block_tables.fill_(7)  # stale values from an earlier step
    md = AttentionMetadata(
        slot_mapping=torch.tensor([33, 50, 2]), query_start_loc=torch.arange(4, dtype=torch.int32),
        seq_lens=torch.tensor([2, 3, 1], dtype=torch.int32),
        block_tables=torch.tensor([[2, 1], [3, 4], [0, 0]], dtype=torch.int32),
        num_decode_seqs=3, max_query_len=1, max_seq_len=3,
    )
    buf.fill(torch.tensor([5, 6, 7]), torch.tensor([1, 2, 0]), md, 4)
    assert buf.input_ids[:4].tolist() == [5, 6, 7, 0]
    assert buf.positions[:4].tolist() == [1, 2, 0, 0]
    assert buf.slot_mapping[:4].tolist() == [33, 50, 2, -1]
    assert buf.seq_lens[:4].tolist() == [2, 3, 1, 0]
    assert buf.block_tables[:3].tolist() == [[2, 1, 0, 0, 0], [3, 4, 0, 0, 0], [0, 0, 0, 0, 0]]
    got = buf.metadata(4, 99)
    assert got.num_seqs == 4 and got.num_decode_seqs == 4 and got.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        buf.fill(torch.tensor([5, 6, 7]), torch.tensor([1, 2, 0]), md, 2)


def _prefill_md(lens, block_size, width):
    """Sequence i owns blocks i*width .. and holds ``lens[i]`` tokens."""
    tables = torch.tensor([[i * width + j for j in range(width)] for i in range(len(lens))], dtype=torch.int32)
    slots = [i * width * block_size + p for i, n in enumerate(lens) for p in range(n)]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    md = AttentionMetadata(torch.tensor(slots), torch.tensor(cu, dtype=torch.int32),
                           torch.tensor(lens, dtype=torch.int32), tables, 0, max(lens), max(lens))
    positions = torch.cat([torch.arange(n) for n in lens])
    return md, positions


@torch.inference_mode()
def test_padded_decode_matches_eager(tiny_checkpoint):
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    model = load_model(__import__("pathlib").Path(tiny_checkpoint), mc, reference, torch.float32,
                       torch.device("cpu"), 256)
    block_size, width, lens = 4, 4, [5, 9, 3]
    kv = torch.zeros(mc.num_layers, 2, 16, block_size, mc.num_kv_heads, mc.head_dim)
    md, positions = _prefill_md(lens, block_size, width)
    model(torch.randint(3, 100, (sum(lens),)), positions, kv, md)
    # one decode token per sequence, eager and unpadded
    dec_pos = torch.tensor(lens)
    dec_md = AttentionMetadata(
        slot_mapping=torch.tensor([i * width * block_size + n for i, n in enumerate(lens)]),
        query_start_loc=torch.arange(4, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32) + 1,
        block_tables=md.block_tables[:, :3], num_decode_seqs=3, max_query_len=1, max_seq_len=10,
    )
    ids = torch.tensor([11, 12, 13])
    kv_eager = kv.clone()
    want = model.compute_logits(model(ids, dec_pos, kv_eager, dec_md))  # [3, vocab]
    graphs = DecodeGraphs(model, kv, max_num_seqs=4, max_blocks_per_seq=width, max_model_len=16, use_graphs=False)
    graphs.capture()  # no-op without graphs
    got = graphs.run(ids, dec_pos, dec_md)  # padded to 4 rows
    assert got.shape[0] == 4
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, kv_eager)  # the padding row wrote nothing


def test_kv_budget_arithmetic():
    gib = 2**30
    # 80 GiB card, 2 GiB used outside torch (context + another process), torch holds 20 GiB,
    # peak 18 GiB of which 0.5 GiB was the profiling run's own small KV cache
    profile = MemoryProfile(total=80 * gib, free=58 * gib, torch_reserved=20 * gib, torch_peak=18 * gib,
                            profile_kv=gib // 2)
    budget = kv_cache_budget_bytes(profile, 0.9)
    assert budget == int(72 * gib) - 2 * gib - (18 * gib - gib // 2)
    assert num_kv_blocks_for_budget(budget, 2**20) == budget // 2**20
    assert num_kv_blocks_for_budget(budget, 2**20, max_useful_blocks=10) == 10
    assert num_kv_blocks_for_budget(-5, 2**20) == 0
    tight = MemoryProfile(total=10 * gib, free=gib, torch_reserved=9 * gib, torch_peak=9 * gib + gib // 2)
    assert kv_cache_budget_bytes(tight, 0.9) < 0


def test_dummy_model_runs(tiny_checkpoint):
    mc = ModelConfig.from_pretrained(tiny_checkpoint)
    model = build_dummy_model(mc, reference, torch.bfloat16, torch.device("cpu"), 64, seed=1)
    again = build_dummy_model(mc, reference, torch.bfloat16, torch.device("cpu"), 64, seed=1)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    assert torch.all(model.model.norm.weight == 1)
    kv = torch.zeros(mc.num_layers, 2, 4, 4, mc.num_kv_heads, mc.head_dim, dtype=torch.bfloat16)
    md, positions = _prefill_md([6], 4, 2)
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.arange(6), positions, kv, md))
    assert logits.shape == (6, mc.vocab_size) and torch.isfinite(logits).all()
