"""The paged KV cache's bookkeeping: which blocks of the pool each sequence owns.

The pool is ``num_blocks`` blocks of ``block_size`` token slots (the tensor itself lives in the
model runner). A sequence's ``block_table`` lists its blocks in position order; token position
``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Blocks are reference counted so sequences can share them (parallel sampling forks share the
prompt's blocks). A shared block is never written: before a sequence writes into a block whose
count is above one, it gets a private copy (copy-on-write; the copy is returned to the caller,
who copies the KV data before the forward).

Prefix caching hooks in at two places: ``_take_free_block`` (reuse a cached block whose hash
matches, or evict the least recently freed one) and ``_release`` (a full, hashed block goes to
an evictable LRU instead of being wiped). Full blocks are the unit of hashing.
"""

from __future__ import annotations

from collections import deque

from pageant.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when the pool cannot cover the request (check ``can_allocate`` first)."""


class BlockManager:
    """Allocates, shares and frees KV-cache blocks. Invariant: a block id is in the free queue
    exactly when its reference count is zero."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks needed so ``seq`` can compute ``num_new_tokens`` more tokens: new blocks past
        its table, plus one if the block it writes into first is shared (copy-on-write)."""
        total = seq.num_computed_tokens + num_new_tokens
        needed = max(0, self.blocks_for_tokens(total) - len(seq.block_table))
        first = seq.num_computed_tokens // self.block_size
        if num_new_tokens > 0 and first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1:
            needed += 1
        return needed

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    # ------------------------------------------------------------------ changes
    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Grow ``seq.block_table`` to hold ``num_new_tokens`` more tokens and un-share the block it
        writes into. Returns the ``(src_block, dst_block)`` copies the KV data needs."""
        if not self.can_allocate(seq, num_new_tokens):
            raise NoFreeBlocksError(
                f"need {self.num_blocks_needed(seq, num_new_tokens)} blocks, {len(self._free)} free"
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

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (its table must be empty)."""
        if child.block_table:
            raise ValueError("fork target already owns blocks")
        child.block_table = list(parent.block_table)
        for block in parent.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody else uses go back to the pool at once."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    # ------------------------------------------------------------------ hooks
    def _take_free_block(self) -> int:
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        count = self.ref_counts[block] - 1
        if count < 0:
            raise RuntimeError(f"block {block} freed more often than allocated")
        self.ref_counts[block] = count
        if count == 0:
            self._free.append(block)
