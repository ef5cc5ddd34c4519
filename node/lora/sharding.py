"""LoRA adapters split to match a tensor-parallel base model (S-LoRA's scheme), and rank 0's slots.

For every token with an adapter, y += B (A x). Each rank holds the part of A and B that lets it add
its part of the delta with no communication of its own:
    column-parallel base (q, k, v, gate, up; the rank holds rows of the output):
        A replicated [r, in], B split by output rows [out / size, r]: the rank's rows of B (A x) land on
        its rows of the output. The shrink A x is computed on every rank (r * in multiply-adds per
        token, a few percent of the base matmul), so no all-gather of x or of A x is needed.
    row-parallel base (o, down; the rank holds columns of the input, its output is a partial sum):
        A split by input columns [r, in / size], B replicated [out, r]: sum over ranks of B (A_i x_i)
        = B (A x), so each rank adds its B (A_i x_i) to its partial sum before the base's all-reduce,
        which then carries the delta too.
So LoRA adds no collective and no bytes to any collective, on all seven projections. The price is
duplicated work: the shrink of column-parallel and the expand of row-parallel projections run on
every rank. (The alternative, B split for row-parallel projections, would need an all-gather of A x
per layer: S-LoRA's choice for its expand, which we avoid.)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from node.lora.adapter import LoRAWeights
from node.lora.copy_stream import AdapterCopyStream
from node.lora.slots import LoRASlotPools, LoRASlots

_Range = tuple[int, int]


@dataclass(frozen=True)
class LoRAShard:
    """One rank's part of any adapter: rows of the column-parallel modules' B, columns of the
    row-parallel groups' A; everything else whole."""

    out_rows: tuple[tuple[str, _Range], ...]  # module -> rows [start, end) of its B [L, out, r]
    in_cols: tuple[tuple[str, _Range], ...]  # group -> columns [start, end) of its A [L, G * r, in]

    def of(self, weights: LoRAWeights) -> LoRAWeights:
        """This rank's part, as tensors of its own (safe to pickle: no view of the whole adapter)."""
        rows, cols = dict(self.out_rows), dict(self.in_cols)
        a = {g: t[:, :, cols[g][0]:cols[g][1]].clone() if g in cols else t.clone() for g, t in weights.a.items()}
        b = {m: t[:, rows[m][0]:rows[m][1]].clone() if m in rows else t.clone() for m, t in weights.b.items()}
        return LoRAWeights(rank=weights.rank, a=a, b=b, ranks=weights.ranks, b_scale=weights.b_scale)


class ShardedLoRASlotPools(LoRASlotPools):
    """Rank 0's slots: residency is decided here, for every rank. Activating an adapter copies rank
    0's part in and queues the whole adapter (loaded once, from the store) for the other ranks, which
    get their parts scattered with the next step's inputs and write them to the same slot."""

    def __init__(self, pools: list[LoRASlots], shards: tuple[LoRAShard, ...]):
        super().__init__(pools)
        self.shards = shards
        self._pending: list[tuple[int, LoRAWeights]] = []  # (global slot, whole adapter)

    def activate(self, adapter_id: str, weights: LoRAWeights, in_use: Collection[str],
                 copies: AdapterCopyStream | None = None) -> int:
        slot = self.lookup(adapter_id)
        if slot is not None:
            return slot
        slot = super().activate(adapter_id, self.shards[0].of(weights), in_use, copies)
        self._pending.append((slot, weights))
        return slot

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def take_writes(self) -> list[list[tuple[int, LoRAWeights]]]:
        """Per rank, the (slot, part) copies it owes since the last call (rank 0's are done)."""
        pending, self._pending = self._pending, []
        return [[] if rank == 0 else [(slot, shard.of(w)) for slot, w in pending]
                for rank, shard in enumerate(self.shards)]

