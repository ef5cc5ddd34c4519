"""Paged KV cache bookkeeping: a free list of fixed-size blocks with reference counts.

Pure Python, no torch: block ids index the cache tensors the model runner owns.
"""

from __future__ import annotations

from collections import deque

from node.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_new_tokens` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free):
            raise RuntimeError(f"need {needed} blocks, {len(self.free)} free")  # callers check can_grow
        for _ in range(needed):
            block = self.free.popleft()
            assert self.ref_counts[block] == 0, block
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def share(self, seq: Sequence, donor: Sequence, num_blocks: int) -> None:
        """Start `seq` (nothing computed yet) on the first `num_blocks` full, computed blocks of `donor`
        (the same prompt): their keys and values are read, never written again, so both reference them."""
        assert not seq.block_table and donor.num_computed_tokens >= num_blocks * self.block_size
        seq.block_table = donor.block_table[:num_blocks]
        for block in seq.block_table:
            self.ref_counts[block] += 1
        seq.num_computed_tokens = num_blocks * self.block_size

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody references go back to the free list."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, block
            if self.ref_counts[block] == 0:
                self.free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
