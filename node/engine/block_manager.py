"""Paged KV cache bookkeeping: fixed-size blocks with reference counts, and the prefix cache.

Pure Python, no torch: block ids index the cache tensors the model runner owns.

With prefix caching, a full block whose keys and values are computed is registered under its content
address (`block_hash`: the adapter, the request's cache salt and every token up to its end). A new
sequence starts on the registered blocks of its longest cached prefix (read only: a sequence writes only past its cached
blocks), so its prefill skips them. A block nobody references any more keeps its content and stays
registered, in an LRU of evictable blocks; blocks are taken from the empty ones first, then from the
least recently freed cached ones. A partial block is never registered, so never shared.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from node.engine.block_hash import BlockHash, extend_chain
from node.engine.sequence import Sequence


@dataclass(frozen=True)
class KVCacheStats:
    """What the KV cache holds and how often a prompt found its prefix there (counters since start)."""

    num_blocks: int
    num_free_blocks: int  # empty, or cached and referenced by no sequence (evictable)
    num_cached_blocks: int  # registered under a content hash, referenced or not
    num_queried_tokens: int  # tokens of the sequences admitted with a cache lookup
    num_hit_tokens: int  # of those, tokens found in the cache (their prefill skipped)
    num_evictions: int  # cached blocks emptied to hand out a block

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"num_blocks": self.num_blocks, "num_free_blocks": self.num_free_blocks,
                "num_cached_blocks": self.num_cached_blocks, "num_queried_tokens": self.num_queried_tokens,
                "num_hit_tokens": self.num_hit_tokens, "num_evictions": self.num_evictions}


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = False):
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_counts = [0] * num_blocks
        self.empty: deque[int] = deque(range(num_blocks))  # free blocks holding nothing
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recent first
        self.hash_of: list[BlockHash | None] = [None] * num_blocks
        self.owner: list[str | None] = [None] * num_blocks  # adapter of a registered block
        self.by_hash: dict[BlockHash, int] = {}
        self._num_queried = self._num_hit = self._num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(num_blocks=self.num_blocks, num_free_blocks=self.num_free,
                            num_cached_blocks=len(self.by_hash), num_queried_tokens=self._num_queried,
                            num_hit_tokens=self._num_hit, num_evictions=self._num_evictions)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_new_tokens` more computed tokens."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"need {needed} blocks, {self.num_free} free")  # callers check can_grow
        for _ in range(needed):
            block = self._take()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def _take(self) -> int:
        """An empty block, or else the least recently freed cached one, emptied."""
        if self.empty:
            block = self.empty.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self._unregister(block)
            self._num_evictions += 1
        assert self.ref_counts[block] == 0 and self.hash_of[block] is None, block
        return block

    def acquire_prefix(self, seq: Sequence) -> int:
        """Start `seq` (holding no blocks) on the cached blocks of its longest cached prefix; returns the
        tokens it skips. The last token is never among them: its logits are what a prefill is for."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq.request_id
        if not self.enable_caching:
            return 0
        wanted = (seq.num_tokens - 1) // self.block_size
        self._hash_blocks(seq, wanted)
        for h in seq.block_hashes[:wanted]:
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.num_committed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def num_cached_blocks(self, seq: Sequence) -> int:
        """The leading blocks `acquire_prefix` would find cached for `seq` now (a lookup: nothing is
        taken). Hashes only up to the first block not cached."""
        if not self.enable_caching:
            return 0
        wanted, hashes, by_hash = (seq.num_tokens - 1) // self.block_size, seq.block_hashes, self.by_hash
        n = 0  # the scheduler asks every step for a window of waiting requests: a tight loop
        while n < wanted:
            if n == len(hashes):
                self._hash_blocks(seq, n + 1)
            if hashes[n] not in by_hash:
                return n
            n += 1
        return wanted

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_blocks` full blocks (reading only their tokens)."""
        first, size = len(seq.block_hashes), self.block_size
        if num_blocks > first:
            extend_chain(seq.block_hashes, seq.adapter_id, seq.params.cache_salt,
                         seq.tokens(first * size, num_blocks * size), size)

    def count_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted sequence's lookup (the scheduler calls it once the sequence runs)."""
        self._num_queried += num_queried_tokens
        self._num_hit += num_hit_tokens

    def next_block_hash(self, seq: Sequence) -> BlockHash | None:
        """The hash of the first block `seq` has yet to compute, if that block is full in its tokens."""
        i = seq.num_computed_tokens // self.block_size
        return seq.block_hashes[i] if i < len(seq.block_hashes) else None

    def pending_hashes(self, seq: Sequence) -> list[BlockHash]:
        """The hashes of the full blocks a running `seq` has yet to compute (known after acquire_prefix)."""
        return seq.block_hashes[seq.num_computed_tokens // self.block_size:]

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's full blocks computed since the last call (a block whose content is
        registered already, computed twice at once, stays private)."""
        if not self.enable_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        self._hash_blocks(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block, h = seq.block_table[i], seq.block_hashes[i]
            if self.hash_of[block] is None and h not in self.by_hash:
                self.hash_of[block], self.owner[block], self.by_hash[h] = h, seq.adapter_id, block
        seq.num_committed_blocks = num_full

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references (its computed full blocks stay cached). Blocks nobody references
        become free: cached ones at the recent end of the LRU, the sequence's tail first, so that a
        prefix outlives its continuations."""
        self.commit(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, block
            if self.ref_counts[block] == 0:
                if self.hash_of[block] is None:
                    self.empty.append(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_committed_blocks = 0

    def forget_adapter(self, adapter_id: str) -> None:
        """Unregister the adapter's blocks (it is removed: one registered again under its id may have
        other weights). Free ones become empty; referenced ones stay with their sequences, uncached."""
        for block in [b for b in self.by_hash.values() if self.owner[b] == adapter_id]:
            self._unregister(block)
            if block in self.evictable:
                del self.evictable[block]
                self.empty.append(block)

    def _unregister(self, block: int) -> None:
        h = self.hash_of[block]
        assert h is not None and self.by_hash[h] == block, block
        del self.by_hash[h]
        self.hash_of[block] = self.owner[block] = None
