"""Device-resident adapter slots: per layer, stacked [num_slots, ...] A and B tensors, LRU-assigned.

Loading an adapter is a `copy_` into a free (or least recently used, idle) slot: no allocation, fixed
shapes. Every slot is sized to `max_rank`; lower ranks are zero-padded, and `ranks` [num_slots] int32
keeps each slot's true rank so that the Triton kernels skip the padding. The projections are grouped
by their shared input (qkv, o, gate_up, down): one fused LoRA launch covers a whole group, with A
stacked as [S, G * r, in] and B as [S, sum of out, r] (per-module B tensors are views into it).
Each group's A and B is one tensor over all layers ([num_layers, S, ...]; the per-layer `a`, `b_group`
and `b` are views of it), and the host weights have the same layout, so copying an adapter in is one
copy per group (A) and per module (B) for all layers at once. A slot remembers which parts its last
adapter wrote, and only those the new one does not overwrite are zeroed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection

import torch

from node.errors import Overloaded
from node.lora.adapter import GROUPS, LoRATargetSpec, LoRAWeights
from node.lora.copy_stream import AdapterCopyStream
from node.lora.mapping import build_plan
from node.lora.ops import Form, LoRAPlan, apply_lora

log = logging.getLogger(__name__)
MAX_SCALARS = 256
_SCALARS: dict[float, torch.Tensor] = {}  # `_scalar`
_Extent = tuple[int, int]  # (num_layers, rank) of the nonzero part a slot holds for one group or module


class LoRASlots:
    @staticmethod
    def slot_nbytes(target: LoRATargetSpec, max_rank: int, dtype: torch.dtype) -> int:
        """Device bytes of one slot: every layer's stacked A and B at `max_rank`."""
        elem = torch.tensor([], dtype=dtype).element_size()
        per_layer = 0
        for modules in GROUPS.values():
            per_layer += len(modules) * max_rank * target.shape(modules[0])[0]  # A: [len * r, in]
            per_layer += sum(target.shape(m)[1] * max_rank for m in modules)  # B: [out, r] each
        return per_layer * target.num_layers * elem

    def __init__(self, target: LoRATargetSpec, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_slots, self.max_rank, self.num_layers = num_slots, max_rank, target.num_layers
        self.slot_bytes = self.slot_nbytes(target, max_rank, dtype)
        self.num_loads = self.num_evictions = 0  # copies in, and idle adapters pushed out for them
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, least recent first
        self.free = list(range(num_slots - 1, -1, -1))
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)  # true rank per slot
        self.widths = {group: tuple(target.shape(m)[1] for m in modules) for group, modules in GROUPS.items()}
        num_layers = target.num_layers
        self.a_all: dict[str, torch.Tensor] = {}  # group -> [L, S, len(group) * r, in]
        self.b_all: dict[str, torch.Tensor] = {}  # group -> [L, S, sum of out, r]
        for group, modules in GROUPS.items():
            d_in = target.shape(modules[0])[0]
            self.a_all[group] = torch.zeros(num_layers, num_slots, len(modules) * max_rank, d_in, dtype=dtype,
                                            device=device)
            self.b_all[group] = torch.zeros(num_layers, num_slots, sum(self.widths[group]), max_rank, dtype=dtype,
                                            device=device)
        self.a = [{g: t[layer] for g, t in self.a_all.items()} for layer in range(num_layers)]  # [S, G * r, in]
        self.b_group = [{g: t[layer] for g, t in self.b_all.items()} for layer in range(num_layers)]
        self.b: list[dict[str, torch.Tensor]] = []  # per layer: module -> [S, out, r], a view of b_group
        for b_group in self.b_group:
            self.b.append({m: view for group, modules in GROUPS.items()
                           for m, view in zip(modules, b_group[group].split(list(self.widths[group]), dim=1),
                                              strict=True)})
        self._extents: list[dict[str, _Extent]] = [{} for _ in range(num_slots)]
        # each slot's part of every group's A [L, G * r, in] and module's B [L, out, r], all layers: views
        # made once, so that a write is its copies and no indexing
        self._dst: list[dict[str, torch.Tensor]] = [self._slot_views(slot) for slot in range(num_slots)]
        self._rank_of = [0] * num_slots  # `ranks`, as written last (a write of the same rank skips it)
        # per slot: the (A names, B names, rank, layers) of its last adapter if that one filled every part
        # it wrote (full shapes): an adapter of the same layout then just overwrites them (`_write`)
        self._full_layout: list[tuple[object, ...] | None] = [None] * num_slots

    def _slot_views(self, slot: int) -> dict[str, torch.Tensor]:
        views = {group: t[:, slot] for group, t in self.a_all.items()}
        for group, modules in GROUPS.items():
            parts = self.b_all[group][:, slot].split_with_sizes(list(self.widths[group]), dim=1)  # [L, out, r] each
            views.update(zip(modules, parts, strict=True))
        return views

    def lookup(self, adapter_id: str) -> int | None:
        """The slot of a resident adapter (now the most recently used), None if it is not on the device."""
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.slot_of.move_to_end(adapter_id)
        return slot

    def activate(self, adapter_id: str, weights: LoRAWeights, in_use: Collection[str],
                 copies: AdapterCopyStream | None = None, base: int = 0) -> int:
        """The slot holding `adapter_id`, copying it in (evicting an idle one) if it is not resident.
        With `copies`, the copy is ordered by its events (global slot id: `base` + the pool's own)."""
        if adapter_id in self.slot_of:
            self.slot_of.move_to_end(adapter_id)
            return self.slot_of[adapter_id]
        if not self.free:
            victim = next((a for a in self.slot_of if a not in in_use), None)
            if victim is None:
                raise Overloaded("every adapter slot is in use", num_slots=self.num_slots)
            self.free.append(self.slot_of.pop(victim))
            self.num_evictions += 1
            log.debug("evicted adapter %s from its slot", victim)
        slot = self.free.pop()
        if copies is None:
            self._write(slot, weights)
        else:
            with copies.writing(adapter_id, base + slot) as is_async:
                self._write(slot, weights, is_async)
        self.num_loads += 1
        self.slot_of[adapter_id] = slot
        return slot

    def remove(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id, None)
        if slot is not None:
            self.free.append(slot)

    def _write(self, slot: int, weights: LoRAWeights, is_async: bool = False) -> None:
        """Copy the host stacks in: one copy per group's A and per module's B (times the adapter's
        `b_scale`), all layers at once (`is_async`: non-blocking, from pinned memory: the host stacks
        if they are pinned, else a staging copy that torch keeps until the copy is done)."""
        r, r_max = weights.rank, self.max_rank
        assert r <= r_max, "the parser refuses ranks above max_lora_rank"
        if self._rank_of[slot] != r:
            self.ranks[slot] = self._rank_of[slot] = r
        extents, views = self._extents[slot], self._dst[slot]
        layout = (tuple(weights.a), tuple(weights.b), r, weights.num_layers)
        if self._full_layout[slot] != layout:
            if extents or (r, layout[3]) != (r_max, self.num_layers):
                self._write_parts(slot, weights, layout, is_async)  # some parts to clear or reshape
                return
            # an empty slot (never written, or cleared) and an adapter filling every part it writes
            extents.update(dict.fromkeys((*weights.a, *weights.b), (layout[3], r)))
            self._full_layout[slot] = layout
        for group, src in weights.a.items():  # the same parts, all of them: no clearing, no reshaping
            views[group].copy_(_staged(src, is_async), non_blocking=is_async)
        for m, src in weights.b.items():
            _copy_scaled(views[m], src, weights.b_scale, is_async)

    def _write_parts(self, slot: int, weights: LoRAWeights, layout: tuple[object, ...], is_async: bool) -> None:
        """`_write` part by part: zero what the slot's last adapter wrote and this one does not overwrite,
        and copy a lower rank or fewer layers into the top-left corner of each part."""
        r, r_max = weights.rank, self.max_rank
        extents, views = self._extents[slot], self._dst[slot]
        is_full = True
        for group, modules in GROUPS.items():
            src = weights.a.get(group)  # [Lw, G * r, in]; a group absent now and before is not touched
            if src is not None or group in extents:
                dst = views[group]  # [L, G * r_max, in]
                if self._clear(dst, extents, group, src, r) and src is not None:
                    if src.shape != dst.shape:  # fewer layers or a lower rank: [Lw, G, r_max, in] <- [Lw, G, r, in]
                        is_full = False
                        num_layers, d_in = src.shape[0], src.shape[2]
                        dst = dst[:num_layers].view(num_layers, len(modules), r_max, d_in)[:, :, :r]
                        src = src.view(num_layers, len(modules), r, d_in)
                    dst.copy_(_staged(src, is_async), non_blocking=is_async)
            for m in modules:
                b_src = weights.b.get(m)  # [Lw, out, r]
                if b_src is not None or m in extents:
                    b_dst = views[m]  # [L, out, r_max]
                    if self._clear(b_dst, extents, m, b_src, r) and b_src is not None:
                        if b_src.shape != b_dst.shape:
                            is_full = False
                            b_dst = b_dst[:b_src.shape[0], :, :r]
                        _copy_scaled(b_dst, b_src, weights.b_scale, is_async)
        self._full_layout[slot] = layout if is_full else None

    @staticmethod
    def _clear(dst: torch.Tensor, extents: dict[str, _Extent], name: str, src: torch.Tensor | None,
               rank: int) -> bool:
        """Zero the slot's part `dst` if its last adapter wrote more of it than `src` will overwrite;
        record what is written now. Returns whether there is anything to copy."""
        old = extents.pop(name, None)
        new = (src.shape[0], rank) if src is not None else None
        if old is not None and (new is None or old[0] > new[0] or old[1] > new[1]):
            dst.zero_()
        if new is not None:
            extents[name] = new
        return src is not None


def _copy_scaled(dst: torch.Tensor, src: torch.Tensor, scale: float, is_async: bool) -> None:
    """dst <- src * scale, the product in float32 (as the host stacks are) and then cast to the slot's
    dtype: the same values as scaling on the host first, without a pass over the host stacks."""
    if scale == 1.0:
        dst.copy_(_staged(src, is_async), non_blocking=is_async)
    elif dst.device == src.device:
        torch.mul(src, _scalar(scale), out=dst)  # one pass: read the host stack, write the slot
    elif dst.dtype == src.dtype:
        dst.copy_(_staged(src, is_async), non_blocking=is_async)
        dst.mul_(scale)  # on the device, in the copy's stream
    else:  # a bfloat16 slot: multiply the float32 copy on the device, then cast
        torch.mul(_staged(src, is_async).to(dst.device, non_blocking=is_async), scale, out=dst)


def _scalar(scale: float) -> torch.Tensor:
    """The scaling as a float32 0-dim tensor, made once per value: a product with it is the product with
    the float (float32 either way), without wrapping the float into a tensor on every copy."""
    t = _SCALARS.get(scale)
    if t is None:
        if len(_SCALARS) >= MAX_SCALARS:
            _SCALARS.clear()
        t = _SCALARS[scale] = torch.tensor(scale, dtype=torch.float32)
    return t


def _staged(src: torch.Tensor, is_async: bool) -> torch.Tensor:
    """The host tensor to copy from: pinned for a non-blocking copy (the caching host allocator keeps
    the staging block until the copy that reads it is done)."""
    return src.pin_memory() if is_async and not src.is_pinned() else src


class LoRASlotPools:
    """The engine's device slots: one `LoRASlots` pool per rank, so that an adapter pays for its own
    rank, not the node's largest (S-LoRA pages adapters by rank for the same reason).

    Pools are (rank, num_slots), smallest rank first; global slot ids run through the pools in that
    order (pool p holds ids base_p .. base_p + n_p - 1). An adapter goes to the smallest pool whose
    rank holds it, taking a free slot there, else a free slot of a larger pool, else evicting the
    least recently used idle adapter of the smallest pool that has one. Each pool is one LoRA call
    per group and layer, over the tokens whose adapter it holds. One pool (the default: every slot
    at `max_lora_rank`) is exactly the single stacked layout of `LoRASlots`.
    """

    def __init__(self, pools: list[LoRASlots]):
        ranks = [pool.max_rank for pool in pools]
        if not pools or len(set(ranks)) != len(ranks):
            raise ValueError(f"rank pools need distinct ranks: {ranks}")
        self.pools = sorted(pools, key=lambda pool: pool.max_rank)
        self.bases = [sum(pool.num_slots for pool in self.pools[:i]) for i in range(len(self.pools))]
        self.num_slots = sum(pool.num_slots for pool in self.pools)
        self.max_rank = self.pools[-1].max_rank
        self.device = self.pools[0].ranks.device
        self.num_hits = self.num_misses = 0  # requests that found their adapter on the device, or not

    def stats(self) -> dict[str, float]:
        """The device tier's counters, as the adapter store reports its own tiers (tier -> stat)."""
        return {"hits": self.num_hits, "misses": self.num_misses,
                "num_loads": sum(p.num_loads for p in self.pools),
                "evictions": sum(p.num_evictions for p in self.pools),
                "nbytes": sum(p.slot_bytes * len(p.slot_of) for p in self.pools),
                "num_slots": self.num_slots, "num_resident": sum(len(p.slot_of) for p in self.pools)}

    @classmethod
    def build(cls, target: LoRATargetSpec, pools: tuple[tuple[int, int], ...], dtype: torch.dtype,
              device: torch.device) -> LoRASlotPools:
        """Pools of (rank, num_slots), allocated on `device`."""
        return cls([LoRASlots(target, num, rank, dtype, device) for rank, num in pools])

    @staticmethod
    def pools_nbytes(target: LoRATargetSpec, pools: tuple[tuple[int, int], ...], dtype: torch.dtype) -> int:
        return sum(num * LoRASlots.slot_nbytes(target, rank, dtype) for rank, num in pools)

    @property
    def slot_of(self) -> dict[str, int]:
        """Resident adapter -> global slot (a snapshot)."""
        return {a: base + s for pool, base in zip(self.pools, self.bases, strict=True) for a, s in pool.slot_of.items()}

    def lookup(self, adapter_id: str) -> int | None:
        for pool, base in zip(self.pools, self.bases, strict=True):
            slot = pool.lookup(adapter_id)
            if slot is not None:
                return base + slot
        return None

    def has_free_slot(self, rank: int) -> bool:
        """Whether an adapter of `rank` can be copied in without evicting anyone."""
        return any(pool.free for pool in self.pools if pool.max_rank >= rank)

    def activate(self, adapter_id: str, weights: LoRAWeights, in_use: Collection[str],
                 copies: AdapterCopyStream | None = None) -> int:
        """The global slot holding `adapter_id`, copying it in (evicting an adapter not `in_use`) if needed."""
        slot = self.lookup(adapter_id)
        if slot is not None:
            return slot
        fitting = [(pool, base) for pool, base in zip(self.pools, self.bases, strict=True)
                   if pool.max_rank >= weights.rank]
        assert fitting, "the parser refuses ranks above max_lora_rank, the largest pool's rank"
        pool, base = next(((p, b) for p, b in fitting if p.free), (None, 0))
        if pool is None:
            pool, base = next(((p, b) for p, b in fitting if any(a not in in_use for a in p.slot_of)),
                              fitting[0])
        return base + pool.activate(adapter_id, weights, in_use, copies, base)

    def remove(self, adapter_id: str) -> None:
        for pool in self.pools:
            pool.remove(adapter_id)

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into global slot `slot`, chosen elsewhere (a tensor-parallel worker follows
        rank 0's choices, so its slots hold the same adapters in the same places)."""
        for pool, base in zip(self.pools, self.bases, strict=True):
            if base <= slot < base + pool.num_slots:
                pool._write(slot - base, weights)
                return
        raise IndexError(f"no slot {slot} in {self.num_slots} slots")

    def batch(self, token_slots: list[int], form: Form | None = None) -> LoRABatch | None:
        """This step's LoRA hook: a plan per pool over the tokens whose adapter it holds (global slot
        ids in, each pool's own ids in its plan); None when no token has an adapter."""
        if len(self.pools) == 1:  # the default: global ids are the pool's own, no per-step copy
            plan = build_plan(token_slots, self.device, form)
            return LoRABatch([(self.pools[0], plan)]) if plan is not None else None
        parts = []
        for pool, base in zip(self.pools, self.bases, strict=True):
            end = base + pool.num_slots
            plan = build_plan([s - base if base <= s < end else -1 for s in token_slots], self.device, form)
            if plan is not None:
                parts.append((pool, plan))
        return LoRABatch(parts) if parts else None

    def pools_in_use(self, token_slots: list[int]) -> tuple[int, ...]:
        """Indices of the pools holding some token's adapter (a decode graph is captured per such set)."""
        return tuple(i for i, (pool, base) in enumerate(zip(self.pools, self.bases, strict=True))
                     if any(base <= s < base + pool.num_slots for s in token_slots))

    def static_batch(self, token_slots: torch.Tensor, pools: tuple[int, ...] | None = None) -> LoRABatch:
        """The gather plans over a device buffer of global slot ids, for the pools in `pools` (default:
        all). A CUDA graph captures them: the buffer is refilled before each replay; every plan reads
        it as is, the kernels subtracting the pool's first id and skipping ids outside the pool."""
        empty = token_slots[:0].long()
        chosen = range(len(self.pools)) if pools is None else pools
        return LoRABatch([(self.pools[i], LoRAPlan(tokens=empty, slots=empty, runs=(), form="gather",
                                                   token_slots=token_slots, run_table=empty.int().reshape(0, 3),
                                                   max_run_len=0, slot_base=self.bases[i]))
                          for i in chosen])


class LoRABatch:
    """The `LoRAHook` the model calls: this step's plan over each pool of slots that holds a token's
    adapter (one LoRA call per pool)."""

    def __init__(self, parts: list[tuple[LoRASlots, LoRAPlan]]):
        self.parts = parts

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out: [T, sum of the group's out features], the fused output of the group's projections."""
        for slots, plan in self.parts:
            apply_lora(x, out, slots.a[layer][group], slots.b_group[layer][group], slots.widths[group], slots.ranks,
                       plan)
