"""The paged KV cache's bookkeeping: which blocks of the pool each sequence owns.

The pool is ``num_blocks`` blocks of ``block_size`` token slots (the tensor itself lives in the
model runner). A sequence's ``block_table`` lists its blocks in position order; token position
``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Blocks are reference counted so sequences can share them (parallel sampling forks share the
prompt's blocks; with prefix caching, requests share cached prompt prefixes). A shared block is
never written: before a sequence writes into a block whose count is above one, it gets a private
copy (copy-on-write; the copy is returned to the caller, who copies the KV data before the forward).

Prefix caching (``enable_caching``): a full block whose KV is computed (or being computed in the
step just scheduled) is registered under its content hash (see prefix_cache.py). ``lookup`` finds
the cached leading blocks of a new sequence; ``admit`` hands them to it (reference counts) so only
the rest is computed. A block whose count drops to zero keeps its hash and waits in an LRU of
*evictable* blocks: it still counts as free, and is reused for other content only when no
never-cached free block is left (least recently freed first; a sequence frees its blocks tail
first, so a prompt's shared head outlives its private tail).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from pageant.engine.prefix_cache import extend_block_hashes
from pageant.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when the pool cannot cover the request (check ``can_allocate`` first)."""


class BlockManager:
    """Allocates, shares, caches and frees KV-cache blocks.

    Invariants: a block's reference count is zero exactly when it is in ``_free`` (no hash) or in
    ``_evictable`` (has a hash); ``_cached[h] == b`` exactly when ``block_hash[b] == h``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU: least recently freed first
        # in tokens, per admitted sequence (a preempted one counts again when it comes back);
        # sequences that skip the cache (prompt logprobs) are not counted
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody uses, cached ones included (they are reclaimed on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> int:
        """Free blocks needed so ``seq`` can compute ``num_new_tokens`` more tokens: new blocks past
        its table, plus one if the block it writes into first is shared (copy-on-write). With
        ``cached`` (from ``lookup``, for a sequence without blocks) the computed prefix starts after
        them, and those of them now free count too (taking them removes them from the free pool)."""
        if cached:
            total = len(cached) * self.block_size + num_new_tokens
            return self.blocks_for_tokens(total) - len(cached) + sum(1 for b in cached if self.ref_counts[b] == 0)
        total = seq.num_computed_tokens + num_new_tokens
        needed = max(0, self.blocks_for_tokens(total) - len(seq.block_table))
        first = seq.num_computed_tokens // self.block_size
        if num_new_tokens > 0 and first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1:
            needed += 1
        return needed

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, cached) <= self.num_free_blocks

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks holding ``seq``'s leading full blocks (a sequence without blocks). At
        least its last token is left out, so the forward produces logits to sample from."""
        if not self.enable_caching:
            return []
        hashes = extend_block_hashes(seq, self.block_size, (seq.num_tokens - 1) // self.block_size)
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    # ------------------------------------------------------------------ changes
    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a sequence without blocks its cached prefix (``lookup``'s result) as computed
        tokens, and count the query (``seq.num_tokens`` tokens) and its hits."""
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError("admit needs a sequence without blocks")
        for block in cached:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached)
        seq.num_cached_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Grow ``seq.block_table`` to hold ``num_new_tokens`` more tokens and un-share the block it
        writes into. Returns the ``(src_block, dst_block)`` copies the KV data needs."""
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeBlocksError(
                f"need {self.num_blocks_needed(seq, num_new_tokens)} blocks, {self.num_free_blocks} free"
            )
        copies: list[tuple[int, int]] = []
        first = seq.num_computed_tokens // self.block_size
        if num_new_tokens > 0 and first < len(seq.block_table):
            shared = seq.block_table[first]
            if self.ref_counts[shared] > 1:
                private = self._take_free_block()
                self.ref_counts[shared] -= 1
                seq.block_table[first] = private
                copies.append((shared, private))
        total = seq.num_computed_tokens + num_new_tokens
        for _ in range(self.blocks_for_tokens(total) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())
        return copies

    def cache_blocks(self, seq: Sequence) -> list[int]:
        """Register ``seq``'s full blocks within its ``num_computed_tokens`` (call once the step that
        computes them is scheduled); returns the blocks newly registered. A block whose content is
        already cached elsewhere (a fork that sampled the same tokens) stays unregistered."""
        if not self.enable_caching:
            return []
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return []
        hashes = extend_block_hashes(seq, self.block_size, num_full)
        added = []
        for i in range(seq.num_cached_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self._cached:
                self.block_hash[block] = h
                self._cached[h] = block
                added.append(block)
        seq.num_cached_blocks = num_full
        return added

    def uncache(self, blocks: list[int]) -> None:
        """Forget the hashes of ``blocks`` (their KV is not trustworthy: the step failed)."""
        for block in blocks:
            h = self.block_hash[block]
            if h is None:
                continue
            self.block_hash[block] = None
            if self._cached.get(h) == block:
                del self._cached[h]
            if block in self._evictable:
                del self._evictable[block]
                self._free.append(block)

    def reset_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their data but are no longer shared with
        new requests); the counters are kept."""
        self.uncache([b for b in range(self.num_blocks) if self.block_hash[b] is not None])

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (its table must be empty)."""
        if child.block_table:
            raise ValueError("fork target already owns blocks")
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks
        for block in parent.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else uses go back to the pool at once (cached
        ones to the evictable LRU, tail first)."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past those holding ``seq.num_computed_tokens`` tokens (speculative
        decoding: the slots of rejected proposals; such blocks were allocated this step, so they are
        private and were never registered in the cache)."""
        keep = self.blocks_for_tokens(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if the bookkeeping is inconsistent (for tests and debugging)."""
        free, lru = set(self._free), set(self._evictable)
        unused = {b for b in range(self.num_blocks) if self.ref_counts[b] == 0}
        if len(free) != len(self._free) or free & lru or free | lru != unused or min(self.ref_counts) < 0:
            raise RuntimeError("free lists and reference counts disagree")
        if any(self.block_hash[b] is None for b in lru) or any(self.block_hash[b] is not None for b in free):
            raise RuntimeError("evictable blocks must be exactly the unused cached ones")
        if {h: b for b, h in enumerate(self.block_hash) if h is not None} != self._cached:
            raise RuntimeError("hash table and block hashes disagree")

    # ------------------------------------------------------------------ internals
    def _take_free_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        count = self.ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        self.ref_counts[block] = count
        if count == 0:
            if self.block_hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)
