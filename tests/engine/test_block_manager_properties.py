"""The block manager's invariants under random traffic (hypothesis): blocks are never lost or doubly
owned, a block is evicted only when nobody references it, nobody writes a shared or cached block, and
a sequence only ever reads a cached block that holds exactly its own prefix under its own adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from node.engine.block_manager import BlockManager
from node.engine.sampling import SamplingParams
from node.engine.sequence import Sequence

BLOCK_SIZE = 2
NUM_BLOCKS = 12
Content = tuple[str | None, tuple[int, ...]]  # (adapter, every token up to the block's end)


@dataclass
class Model:
    """The block manager, its live sequences, and what each block was last written with."""

    bm: BlockManager = field(default_factory=lambda: BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_caching=True))
    live: list[Sequence] = field(default_factory=list)
    written: dict[int, Content] = field(default_factory=dict)

    def admit(self, tokens: list[int], adapter: str | None) -> None:
        seq = Sequence(request_id=str(len(self.live)), prompt_token_ids=tokens, params=SamplingParams(),
                       adapter_id=adapter, arrival=0)
        self.bm.acquire_prefix(seq)
        for i, block in enumerate(seq.block_table):  # what it reads is what it would have computed
            assert self.written[block] == (adapter, tuple(tokens[:(i + 1) * BLOCK_SIZE]))
        if self.bm.can_grow(seq, seq.num_pending):
            self.bm.grow(seq, seq.num_pending)
            self.live.append(seq)
        else:
            self.bm.release(seq)

    def compute(self, index: int, num_tokens: int, next_token: int) -> None:
        """A step: up to `num_tokens` of its pending tokens computed (keys written), then committed; a
        sequence with nothing pending decodes `next_token`."""
        seq = self.live[index % len(self.live)]
        if seq.num_pending == 0:
            seq.output_token_ids.append(next_token)
            if not self.bm.can_grow(seq, 1):
                return
            self.bm.grow(seq, 1)
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + min(num_tokens, seq.num_pending)
        for pos in range(start, end):
            block = seq.block_table[pos // BLOCK_SIZE]
            assert self.bm.ref_counts[block] == 1 and self.bm.hash_of[block] is None, "a shared block written"
            self.written[block] = (seq.adapter_id, tuple(seq.token_ids[:(pos // BLOCK_SIZE + 1) * BLOCK_SIZE]))
        seq.num_computed_tokens = end
        self.bm.commit(seq)

    def release(self, index: int) -> None:
        self.bm.release(self.live.pop(index % len(self.live)))

    def check(self) -> None:
        bm = self.bm
        refs = [0] * NUM_BLOCKS
        for seq in self.live:
            for block in seq.block_table:
                refs[block] += 1
        assert refs == bm.ref_counts
        empty, evictable = set(bm.empty), set(bm.evictable)
        assert len(empty) == len(bm.empty) and not empty & evictable
        assert all((refs[b] == 0) == (b in empty | evictable) for b in range(NUM_BLOCKS))
        assert all(bm.hash_of[b] is None for b in empty) and all(bm.hash_of[b] is not None for b in evictable)
        assert {bm.hash_of[b]: b for b in range(NUM_BLOCKS) if bm.hash_of[b] is not None} == bm.by_hash
        for seq in self.live:  # a block two sequences hold is a cached one
            for block in seq.block_table:
                assert refs[block] == 1 or bm.hash_of[block] is not None


tokens = st.lists(st.integers(0, 2), min_size=1, max_size=7)  # few tokens: prefixes repeat, and hit
ops = st.one_of(
    st.tuples(st.just("admit"), tokens, st.sampled_from([None, "sea", "count"])),
    st.tuples(st.just("compute"), st.integers(0, 50), st.integers(1, 4), st.integers(0, 2)),
    st.tuples(st.just("release"), st.integers(0, 50)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_random_traffic_keeps_the_block_managers_invariants(steps: list[tuple[object, ...]]) -> None:
    model = Model()
    for op, *args in steps:
        if op == "admit":
            model.admit(*args)  # type: ignore[arg-type]
        elif model.live and op == "compute":
            model.compute(*args)  # type: ignore[arg-type]
        elif model.live and op == "release":
            model.release(*args)  # type: ignore[arg-type]
        model.check()
    for seq in list(model.live):
        model.bm.release(seq)
    model.live.clear()
    model.check()
    assert model.bm.num_free == NUM_BLOCKS
