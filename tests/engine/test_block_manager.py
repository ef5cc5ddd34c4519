"""The block manager hands out and takes back fixed-size KV blocks with reference counts."""

from __future__ import annotations

import pytest

from node.engine.block_manager import BlockManager
from node.engine.sampling import SamplingParams
from node.engine.sequence import Sequence


def _seq(num_tokens: int, name: str = "r") -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=list(range(num_tokens)), params=SamplingParams(),
                    adapter_id=None, arrival=0)


def test_blocks_cover_the_computed_tokens_and_grow_one_block_at_a_time() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(9)
    assert bm.blocks_needed(seq, 9) == 3
    bm.grow(seq, 9)
    seq.num_computed_tokens = 9
    assert len(seq.block_table) == 3 and bm.num_free == 5
    assert bm.blocks_needed(seq, 3) == 0  # tokens 10..12 still fit in the third block
    bm.grow(seq, 4)
    assert len(seq.block_table) == 4 and len(set(seq.block_table)) == 4


def test_release_returns_every_block_and_resets_the_sequence() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _seq(3, "a"), _seq(4, "b")
    bm.grow(a, 3)
    bm.grow(b, 4)
    assert bm.num_free == 0
    assert not bm.can_grow(_seq(1, "c"), 1)
    bm.release(a)
    assert bm.num_free == 2 and a.block_table == [] and a.num_computed_tokens == 0
    assert all(count == 1 for block, count in enumerate(bm.ref_counts) if block in b.block_table)


def test_growing_past_the_free_blocks_fails_loudly() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    with pytest.raises(RuntimeError, match="need 3 blocks, 2 free"):
        bm.grow(_seq(6), 6)


def _prompt(tokens: list[int], adapter: str | None = None, name: str = "r") -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=list(tokens), params=SamplingParams(),
                    adapter_id=adapter, arrival=0)


def _compute(bm: BlockManager, seq: Sequence) -> None:
    """What a prefill does to the bookkeeping: blocks for every pending token, all of them computed."""
    bm.grow(seq, seq.num_pending)
    seq.num_computed_tokens = seq.num_tokens


def test_one_prefix_under_one_adapter_is_computed_once_and_under_two_never_shared() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    system = list(range(100, 112))  # three full blocks
    first = _prompt([*system, 1, 2], "sea")
    assert bm.acquire_prefix(first) == 0
    _compute(bm, first)
    bm.commit(first)
    again = _prompt([*system, 3], "sea")
    assert bm.acquire_prefix(again) == 12 and again.block_table == first.block_table[:3]
    assert again.block_hashes == first.block_hashes[:3]
    other = _prompt([*system, 3], "count")
    base = _prompt([*system, 3])
    assert bm.acquire_prefix(other) == 0 == bm.acquire_prefix(base)
    _compute(bm, other)
    _compute(bm, base)
    bm.commit(other)
    bm.commit(base)
    assert not {*other.block_table, *base.block_table} & set(first.block_table)
    chains = [s.block_hashes[:3] for s in (first, other, base)]
    assert len({h for chain in chains for h in chain}) == 9  # three namespaces, no hash in two of them


def test_a_lookup_counts_the_cached_prefix_without_taking_it() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    first = _prompt([*range(100, 112), 1], "sea")
    _compute(bm, first)
    bm.commit(first)
    bm.release(first)
    free = bm.num_free
    hit, diverging = _prompt([*range(100, 112), 2], "sea"), _prompt([*range(100, 108), 0, 0, 0, 0, 2], "sea")
    assert bm.num_cached_blocks(hit) == 3 and bm.num_cached_blocks(diverging) == 2
    assert bm.num_cached_blocks(_prompt([*range(100, 112), 2], "count")) == 0  # another adapter's namespace
    assert bm.num_free == free and not hit.block_table  # nothing taken
    assert bm.acquire_prefix(hit) == 3 * 4


def test_the_last_token_and_partial_blocks_are_never_taken_from_the_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    seq = _prompt(list(range(10)))  # blocks [0..3] [4..7] and a partial [8, 9]
    _compute(bm, seq)
    bm.release(seq)
    assert bm.stats().num_cached_blocks == 2  # the partial block went back empty
    exact = _prompt(list(range(8)))  # two full blocks: the second holds its last token, so is recomputed
    assert bm.acquire_prefix(exact) == 4 and exact.num_pending == 4
    longer = _prompt([*range(10), 77])
    assert bm.acquire_prefix(longer) == 8 and longer.num_pending == 3


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=5, block_size=2, enable_caching=True)
    old, new = _prompt([1, 2, 3, 4, 5], name="old"), _prompt([6, 7, 8], name="new")
    _compute(bm, old)
    _compute(bm, new)
    bm.release(old)  # cached: [3 4], then [1 2] (a tail goes before its prefix); the partial [5] is empty
    bm.release(new)  # cached: [6 7] after them; [8] empty
    assert bm.num_free == 5 and bm.stats().num_cached_blocks == 3
    taker = _prompt([9] * 6)
    bm.grow(taker, 6)  # the two empty blocks, then the least recently freed: old's tail [3 4]
    assert bm.stats().num_evictions == 1
    assert bm.acquire_prefix(_prompt([1, 2, 3, 4, 0], name="a")) == 2  # [1 2] survived, [3 4] did not
    assert bm.acquire_prefix(_prompt([6, 7, 0], name="b")) == 2


def test_a_referenced_block_is_never_evicted() -> None:
    bm = BlockManager(num_blocks=3, block_size=2, enable_caching=True)
    donor = _prompt([1, 2, 3])
    _compute(bm, donor)
    bm.release(donor)
    reader = _prompt([1, 2, 9], name="reader")
    assert bm.acquire_prefix(reader) == 2
    shared = reader.block_table[0]
    hungry = _prompt([5] * 5, name="hungry")
    assert not bm.can_grow(hungry, 5)  # 3 blocks wanted, 2 free: the one the reader holds is not
    bm.grow(hungry, 4)
    assert shared not in hungry.block_table and bm.ref_counts[shared] == 1


def test_a_removed_adapter_leaves_nothing_in_the_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_caching=True)
    seq = _prompt([1, 2, 3, 4, 5], "sea")
    _compute(bm, seq)
    bm.release(seq)
    bm.forget_adapter("sea")
    assert bm.stats().num_cached_blocks == 0 and bm.num_free == 4
    assert bm.acquire_prefix(_prompt([1, 2, 3, 4, 5], "sea")) == 0


def test_with_caching_off_nothing_is_looked_up_or_kept() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = _prompt([1, 2, 3, 4, 5])
    _compute(bm, seq)
    bm.release(seq)
    assert bm.acquire_prefix(_prompt([1, 2, 3, 4, 5])) == 0 and bm.stats().num_cached_blocks == 0
