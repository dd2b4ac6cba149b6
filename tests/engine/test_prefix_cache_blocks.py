"""Prefix caching in the block manager and the scheduler on their own (no model): hashing, hits,
LRU eviction, reference counts, salts and adapters kept apart, preemption re-finding its blocks."""

from __future__ import annotations

import pytest

from pageant.engine.block_manager import BlockManager
from pageant.engine.outputs import RequestMetrics
from pageant.engine.prefix_cache import BASE_ROOT, adapter_identity, hash_block, root_hash
from pageant.engine.sampling_params import SamplingParams
from pageant.engine.scheduler import Scheduler
from pageant.engine.sequence import Request


def make_seq(tokens: list[int], rid: str = "r", root: bytes = BASE_ROOT, **params):
    params.setdefault("max_tokens", 8)
    req = Request(
        request_id=rid, prompt=None, prompt_token_ids=list(tokens), params=SamplingParams(**params), priority=0,
        metrics=RequestMetrics(arrival_time=0.0), eos_token_ids=frozenset({2}), cache_root=root,
    )
    return req.new_sequence(0, list(tokens), None)


def compute(bm: BlockManager, seq, num_tokens: int | None = None) -> list[int]:
    """What the scheduler does for one step: allocate, advance, register full blocks."""
    n = seq.num_tokens - seq.num_computed_tokens if num_tokens is None else num_tokens
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    return bm.cache_blocks(seq)


def check_invariants(bm: BlockManager) -> None:
    bm.check_invariants()


def admit(bm: BlockManager, seq) -> list[int]:
    cached = bm.lookup(seq)
    bm.admit(seq, cached)
    return cached


def test_hashes_chain_and_are_stable():
    h0 = hash_block(BASE_ROOT, [1, 2, 3, 4])
    assert h0 == hash_block(BASE_ROOT, [1, 2, 3, 4]) and len(h0) == 32
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(hash_block(BASE_ROOT, [1, 2, 3, 9]), [5, 6, 7, 8])
    # the values are fixed by the encoding (sha256), not by the process
    assert BASE_ROOT.hex()[:16] == root_hash(None, None).hex()[:16]
    assert len({BASE_ROOT, root_hash(None, "a"), root_hash(None, "b"), root_hash(b"x", None), root_hash(b"x", "a")}) == 5


def test_shared_leading_blocks_are_reused_and_counted():
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_seq(list(range(10, 24)), "a")  # 14 tokens: 3 full blocks + 2
    assert admit(bm, a) == []
    assert compute(bm, a) == a.block_table[:3]
    b = make_seq(list(range(10, 22)) + [90, 91, 92], "b")  # shares 12 tokens (3 blocks)
    assert admit(bm, b) == a.block_table[:3]
    assert b.num_computed_tokens == 12 and b.block_table == a.block_table[:3]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 2, 1]
    assert bm.num_blocks_needed(b, 3) == 1
    compute(bm, b)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (14 + 15, 12)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16 and sum(bm.ref_counts) == 0 and bm.usage == 0.0
    assert bm.num_cached_blocks == 3
    check_invariants(bm)


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq(list(range(3, 15)))  # exactly 3 full blocks
    admit(bm, a)
    compute(bm, a)
    assert bm.num_cached_blocks == 3
    again = make_seq(list(range(3, 15)), "again")
    assert len(admit(bm, again)) == 2  # the third block is recomputed to get logits
    assert again.num_computed_tokens == 8
    compute(bm, again)  # the recomputed block duplicates cached content: not registered twice
    assert bm.num_cached_blocks == 3 and bm.block_hash[again.block_table[2]] is None


def test_lru_evicts_least_recently_freed_and_never_cached_blocks_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    a = make_seq([1, 2, 3, 4, 9], "a")  # blocks a0, a1 cached, a2 partial
    admit(bm, a)
    compute(bm, a)
    a0, a1, a2 = a.block_table
    bm.free(a)  # tail first: a2 -> plain free list; a1 then a0 -> evictable LRU
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = make_seq([5, 6, 7, 8, 9], "b")
    assert admit(bm, b) == []
    compute(bm, b)  # 3 blocks: the two never-cached ones, then the LRU's oldest (a1)
    assert set(b.block_table) == {3, a2, a1}
    check_invariants(bm)
    assert bm.lookup(make_seq([1, 2, 3, 4, 7], "a-again")) == [a0]
    # a hit takes a0 out of the LRU; freeing puts it back as the most recent
    c = make_seq([1, 2, 5], "c")
    assert admit(bm, c) == [a0] and bm.ref_counts[a0] == 1
    bm.free(b)  # b's blocks: b2 (partial, plain), b1, b0 -> LRU
    bm.free(c)  # c's a0 -> LRU after b's blocks
    d = make_seq([40, 41, 42, 43, 44, 45, 46], "d")  # needs 4 blocks: evicts everything, a0 last
    admit(bm, d)
    taken = []
    for _ in range(4):
        compute(bm, d, 2 if d.num_computed_tokens < 6 else 1)
        taken.append(d.block_table[-1])
    assert taken[-1] == a0
    check_invariants(bm)
    bm.ref_counts[d.block_table[0]] -= 1  # the checker catches a lost reference
    with pytest.raises(RuntimeError):
        bm.check_invariants()
    bm.ref_counts[d.block_table[0]] += 1
    bm.free(d)
    assert bm.num_free_blocks == 4 and sum(bm.ref_counts) == 0
    check_invariants(bm)


def test_salts_and_adapters_never_share(tmp_path):
    bm = BlockManager(num_blocks=32, block_size=4, enable_caching=True)
    tokens = list(range(3, 20))
    ident_a = adapter_identity("a", 1, str(tmp_path))
    roots = [BASE_ROOT, root_hash(None, "salt-1"), root_hash(None, "salt-2"), root_hash(ident_a, None),
             root_hash(ident_a, "salt-1")]
    seqs = []
    for i, root in enumerate(roots):
        seq = make_seq(tokens, f"r{i}", root)
        assert admit(bm, seq) == []
        compute(bm, seq)
        seqs.append(seq)
    assert bm.prefix_cache_hits == 0 and bm.num_cached_blocks == 4 * len(roots)
    again = make_seq(tokens, "again", root_hash(None, "salt-2"))
    assert admit(bm, again) == seqs[2].block_table[:4]


def test_adapter_identity_follows_the_weights(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights-1")
    first = adapter_identity("a", 1, str(tmp_path))
    assert first == adapter_identity("a", 1, str(tmp_path))
    assert first != adapter_identity("b", 1, str(tmp_path)) and first != adapter_identity("a", 2, str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights-2")
    assert adapter_identity("a", 1, str(tmp_path)) != first
    assert adapter_identity("a", 1, "org/not-a-local-folder")  # still an identity


def test_forked_samples_share_cached_blocks_and_copy_on_write():
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    parent = make_seq(list(range(3, 13)), "p", n=2)  # 10 tokens: 2 full + partial
    admit(bm, parent)
    compute(bm, parent)
    child = parent.request.new_sequence(1, list(parent.token_ids), None)
    child.num_computed_tokens = parent.num_computed_tokens
    bm.fork(parent, child)
    assert child.num_cached_blocks == 2 and child.block_hashes == parent.block_hashes
    for s in (parent, child):  # both sample the same tokens (greedy)
        s.token_ids += [50, 51]
    assert bm.allocate(parent, 1) == [(child.block_table[2], parent.block_table[2])]  # COW the partial block
    parent.num_computed_tokens += 1
    bm.allocate(child, 1)
    child.num_computed_tokens += 1
    for s in (parent, child):
        compute(bm, s, 1)
    # both filled block 2 with the same tokens: only one of them is registered
    assert bm.num_cached_blocks == 3
    assert sum(bm.block_hash[s.block_table[2]] is not None for s in (parent, child)) == 1
    check_invariants(bm)
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 16 and sum(bm.ref_counts) == 0
    check_invariants(bm)


def test_uncache_forgets_blocks_of_a_failed_step():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq(list(range(3, 15)), "a")
    admit(bm, a)
    added = compute(bm, a)
    assert len(added) == 3
    bm.uncache(added)
    bm.free(a)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    assert bm.lookup(make_seq(list(range(3, 15)), "b")) == []


def test_caching_off_changes_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(3, 15)), "a")
    assert bm.lookup(a) == []
    assert compute(bm, a) == [] and bm.num_cached_blocks == 0
    bm.free(a)
    assert bm.num_free_blocks == 8


# ---------------------------------------------------------------- scheduler
def fake_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    for seq, _ in out.sample_rows:
        seq.token_ids.append(token)
    return out


def test_scheduler_admits_with_hits_in_the_same_step_and_budget_skips_them():
    sched = Scheduler(BlockManager(64, 4, enable_caching=True), max_num_seqs=8, max_num_batched_tokens=64)
    shared = list(range(3, 19))  # 4 full blocks
    a = make_seq(shared + [30, 31], "a")
    b = make_seq(shared + [40, 41, 42], "b")
    sched.add_request(a.request)
    sched.add_request(b.request)
    out = fake_step(sched)
    # b is admitted after a in the same step and already shares a's 4 blocks (written by this forward)
    assert [(s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("a", 0, 18), ("b", 16, 3)]
    assert out.num_batched_tokens == 21 and len(out.cached_blocks) == 4
    assert b.block_table[:4] == a.block_table[:4]
    assert (sched.block_manager.prefix_cache_queries, sched.block_manager.prefix_cache_hits) == (18 + 19, 16)


def test_prompt_logprobs_requests_skip_the_lookup():
    sched = Scheduler(BlockManager(64, 4, enable_caching=True), max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq(list(range(3, 20)), "a")
    sched.add_request(a.request)
    fake_step(sched)
    b = make_seq(list(range(3, 20)), "b", prompt_logprobs=2)
    sched.add_request(b.request)
    out = fake_step(sched)
    assert [(s.seq.request_id, s.start) for s in out.scheduled if s.seq is b] == [("b", 0)]
    assert sched.block_manager.prefix_cache_queries == 17  # b's lookup is not a query


def test_preempted_sequence_refinds_its_cached_blocks():
    bm = BlockManager(6, 4, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq(list(range(3, 12)), "a", max_tokens=20)  # 9 tokens: 3 blocks
    sched.add_request(a.request)
    fake_step(sched)
    b = make_seq(list(range(50, 57)), "b", max_tokens=20)
    b.request.metrics.arrival_time = 1.0  # newer: the victim
    sched.add_request(b.request)
    fake_step(sched)
    assert bm.num_free_blocks == 1
    for _ in range(8):  # decode until the pool runs out and b is preempted
        out = fake_step(sched)
        if out.preempted:
            break
    assert out.preempted == [b] and b.num_computed_tokens == 0 and b.block_table == []
    cached_b = bm.num_cached_blocks
    sched.finish(a)  # room again: b comes back and re-finds its full blocks
    hits_before = bm.prefix_cache_hits
    out = fake_step(sched)
    (s,) = out.scheduled
    assert s.seq is b and s.start == (b.num_tokens - 1) // 4 * 4 and s.start >= 8
    assert bm.prefix_cache_hits - hits_before == s.start and cached_b >= 2
    check_invariants(bm)


def test_reset_cache_forgets_everything_but_blocks_in_use_stay():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a, b = make_seq(list(range(3, 15)), "a"), make_seq(list(range(20, 30)), "b")
    for s in (a, b):
        admit(bm, s)
        compute(bm, s)
    bm.free(a)
    assert bm.num_cached_blocks == 5
    bm.reset_cache()
    check_invariants(bm)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8 - len(b.block_table)
    assert bm.lookup(make_seq(list(range(3, 15)), "a2")) == []
    bm.free(b)
    assert bm.num_free_blocks == 8
