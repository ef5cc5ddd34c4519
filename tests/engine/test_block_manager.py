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
