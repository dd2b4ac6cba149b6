"""The Triton ops used as the engine uses them, checked against attention computed in float64.

Two sequences share one block pool: chunked prefill (cache write, then prefill attention over the
cached prefix plus the chunk), then decode steps mixed with a late prefill, each step writing its
K/V through the slot mapping first. Every output is compared with causal softmax attention over the
full history of keys and values, so the kernels are checked together, not only one by one.
"""

from __future__ import annotations

import torch

from pageant.kernels import triton_ops as ops

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, SCALE = 8, 4, 2, 16, 0.25


def _expected(q, keys, values, positions):
    """[n, h, d] causal attention of queries at ``positions`` over keys 0..pos, in float64."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = keys.double().repeat_interleave(group, dim=1)  # [t, h, d]
    v = values.double().repeat_interleave(group, dim=1)
    out = []
    for j, pos in enumerate(positions):
        p = torch.softmax(torch.einsum("hd,thd->ht", q[j].double(), k[: pos + 1]) * SCALE, dim=-1)
        out.append(torch.einsum("ht,thd->hd", p, v[: pos + 1]))
    return torch.stack(out).float()


def test_chunked_prefill_then_decode_matches_float64_attention():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(12, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen)  # stale data everywhere
    v_cache = torch.randn(12, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    block_tables = torch.tensor([[7, 2, 9, 4, 0], [5, 11, 1, 3, 8]], dtype=torch.int32)
    history = {0: ([], []), 1: ([], [])}  # every key/value each sequence has cached, in order

    def step(chunks, split_mixed=False):
        """chunks: {seq: num_new_tokens}; one batched step of cache writes + attention."""
        seqs = sorted(chunks)
        q = torch.randn(sum(chunks.values()), NUM_HEADS, HEAD_DIM, generator=gen)
        k = torch.randn(q.shape[0], NUM_KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(q.shape[0], NUM_KV_HEADS, HEAD_DIM, generator=gen)
        slots, positions, starts, seq_lens, row = [], [], [0], [], 0
        for s in seqs:
            done = len(history[s][0])
            for j in range(chunks[s]):
                pos = done + j
                slots.append(int(block_tables[s, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
                positions.append(pos)
                history[s][0].append(k[row + j])
                history[s][1].append(v[row + j])
            row += chunks[s]
            starts.append(row)
            seq_lens.append(done + chunks[s])
        ops.reshape_and_cache(k, v, k_cache, v_cache, torch.tensor(slots))
        tables = block_tables[seqs]
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        qsl = torch.tensor(starts, dtype=torch.int32)
        num_decode = next((i for i, s in enumerate(seqs) if chunks[s] != 1), len(seqs))  # decodes come first
        if num_decode == len(seqs):
            out = ops.paged_attention_decode(q, k_cache, v_cache, tables, lens, SCALE)
        elif num_decode == 0 or not split_mixed:
            out = ops.paged_attention_prefill(q, k_cache, v_cache, tables, qsl, lens, SCALE)
        else:  # as the engine runs a mixed batch: decode kernel, then prefill on the sliced metadata
            nd = num_decode
            out = torch.empty_like(q)
            out[:nd] = ops.paged_attention_decode(q[:nd], k_cache, v_cache, tables[:nd], lens[:nd], SCALE)
            out[nd:] = ops.paged_attention_prefill(q[nd:], k_cache, v_cache, tables[nd:], qsl[nd:] - nd, lens[nd:], SCALE)
        row = 0
        for s in seqs:
            n = chunks[s]
            keys, values = torch.stack(history[s][0]), torch.stack(history[s][1])
            expected = _expected(q[row : row + n], keys, values, positions[row : row + n])
            torch.testing.assert_close(out[row : row + n], expected, rtol=1e-5, atol=1e-5)
            row += n

    step({0: 16})  # first prompt chunk of sequence 0
    step({0: 13, 1: 9})  # the rest of sequence 0's prompt beside sequence 1's prompt
    for _ in range(3):
        step({0: 1, 1: 1})  # decode steps
    step({0: 1, 1: 6})  # a decode token batched with an extend of sequence 1, all through prefill
    step({0: 1, 1: 1})
    step({0: 1, 1: 5}, split_mixed=True)  # the same kind of batch split between the two kernels
    step({0: 1, 1: 1})
