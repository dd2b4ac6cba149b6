"""The block manager and the scheduler on their own (no model)."""

from __future__ import annotations

import pytest

from pageant.engine.block_manager import BlockManager, NoFreeBlocksError
from pageant.engine.outputs import RequestMetrics
from pageant.engine.sampling_params import SamplingParams
from pageant.engine.scheduler import Scheduler
from pageant.engine.sequence import Request, SequenceStatus


def make_request(rid: str, prompt_len: int, arrival: float = 0.0, priority: int = 0, **params) -> Request:
    params.setdefault("max_tokens", 8)
    req = Request(
        request_id=rid, prompt=None, prompt_token_ids=list(range(3, 3 + prompt_len)),
        params=SamplingParams(**params), priority=priority,
        metrics=RequestMetrics(arrival_time=arrival), eos_token_ids=frozenset({2}),
    )
    req.new_sequence(0, list(req.prompt_token_ids), None)
    return req


def fake_step(sched: Scheduler, token: int = 7):
    """Schedule, then append a token to each sequence that samples (what the engine does)."""
    out = sched.schedule()
    for seq, _ in out.sample_rows:
        seq.token_ids.append(token)
    return out


# ---------------------------------------------------------------- block manager
def test_allocate_grow_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_request("a", 6).seqs[0]
    assert bm.num_blocks_needed(seq, 6) == 2
    assert bm.allocate(seq, 6) == []
    seq.num_computed_tokens = 6
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.allocate(seq, 2)  # positions 6, 7 fit in block 2
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    bm.allocate(seq, 1)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(seq, 9)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == [] and bm.usage == 0.0


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", 6)
    parent = req.seqs[0]
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = req.new_sequence(1, list(parent.token_ids), None)
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2]
    assert bm.num_free_blocks == 6
    # the child writes position 6 into the shared partial block: it gets a private copy
    assert bm.num_blocks_needed(child, 1) == 1
    copies = bm.allocate(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    # the parent is now the only owner of its partial block: no copy
    assert bm.allocate(parent, 1) == []
    bm.free(child)
    assert bm.ref_counts[parent.block_table[0]] == 1
    bm.free(parent)
    assert bm.num_free_blocks == 8 and sum(bm.ref_counts) == 0


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_request("a", 2).seqs[0]
    bm.allocate(seq, 2)
    block = seq.block_table[0]
    bm.free(seq)
    with pytest.raises(RuntimeError):
        bm._release(block)


# ---------------------------------------------------------------- scheduler
def test_decodes_first_and_token_budget_chunks_prefill():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = make_request("a", 3, arrival=0)
    sched.add_request(a)
    out = fake_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 3)]
    b = make_request("b", 25, arrival=1)
    sched.add_request(b)
    out = fake_step(sched)
    # a decodes (1 token, first in the batch), b gets the rest of the budget as a chunk
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.num_decode_seqs == 1 and out.num_batched_tokens == 10
    assert [seq.request_id for seq, _ in out.sample_rows] == ["a"]  # b's prefill is not done
    out = fake_step(sched)
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("a", 4, 1), ("b", 9, 9)]
    out = fake_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert [seq.request_id for seq, _ in out.sample_rows] == ["a", "b"]
    out = fake_step(sched)
    assert out.num_decode_seqs == 2 and out.num_batched_tokens == 2


def test_max_num_seqs_caps_the_batch():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 2, arrival=i))
    out = fake_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_preempts_newest_when_blocks_run_out_and_resumes():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_request("old", 4, arrival=0), make_request("new", 4, arrival=1)
    sched.add_request(old)
    sched.add_request(new)
    fake_step(sched)  # both prefilled: 2 blocks used, each now has 5 tokens
    assert bm.num_free_blocks == 2
    fake_step(sched)  # both decode into a second block each: pool exhausted
    assert bm.num_free_blocks == 0
    for _ in range(3):
        fake_step(sched)
    out = fake_step(sched)  # old needs a third block: the newest running one is preempted
    assert [s.request_id for s in out.preempted] == ["new"]
    assert sched.num_preemptions == 1
    new_seq = new.seqs[0]
    assert new_seq.status is SequenceStatus.WAITING and new_seq.num_computed_tokens == 0 and not new_seq.block_table
    assert [s.seq.request_id for s in out.scheduled] == ["old"]
    # once old finishes, new is recomputed from scratch (prompt + its outputs so far)
    sched.finish(old.seqs[0])
    out = fake_step(sched)
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("new", 0, new_seq.num_tokens - 1)]
    sched.finish(new_seq)
    assert bm.num_free_blocks == 4


def test_waiting_request_that_does_not_fit_blocks_later_ones():
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add_request(make_request("a", 8, arrival=0))
    sched.add_request(make_request("big", 8, arrival=1))
    sched.add_request(make_request("small", 1, arrival=2))
    out = fake_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]


def test_priority_orders_waiting_queue():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=100)
    sched.add_request(make_request("low", 2, arrival=0, priority=5))
    sched.add_request(make_request("high", 2, arrival=1, priority=-1))
    out = fake_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["high"]


def test_parallel_sampling_forks_after_prefill():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    req = make_request("p", 6, n=3, seed=1)
    req.seqs[0].generator = None
    sched.add_request(req)
    out = sched.schedule()
    assert len(out.scheduled) == 1 and len(req.seqs) == 3
    assert [idx for _, idx in out.sample_rows] == [0, 0, 0]  # all three sample from the one prefill
    assert bm.num_free_blocks == 14  # prompt blocks shared
    for seq, _ in out.sample_rows:
        seq.token_ids.append(9)
    out = sched.schedule()
    assert out.num_decode_seqs == 3 and len(out.blocks_to_copy) == 2  # partial block un-shared twice
    for seq in list(req.seqs):
        sched.finish(seq)
    assert bm.num_free_blocks == 16
