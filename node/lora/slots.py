"""Device-resident adapter slots: per layer, stacked [num_slots, ...] A and B tensors, LRU-assigned.

Loading an adapter is a `copy_` into a free (or least recently used, idle) slot: no allocation, fixed
shapes. Every slot is sized to `max_rank`; lower ranks are zero-padded, and `ranks` [num_slots] int32
keeps each slot's true rank so that the Triton kernels skip the padding. The projections are grouped
by their shared input (qkv, o, gate_up, down): one shrink and one expand cover a whole group, with A
stacked as [S, G * r, in] and B as [S, sum of out, r] (per-module B tensors are views into it).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection

import torch

from node.errors import Overloaded
from node.lora.adapter import LoRATargetSpec, LoRAWeights
from node.lora.ops import LoRAPlan, apply_lora

log = logging.getLogger(__name__)
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
}


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
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, least recent first
        self.free = list(range(num_slots - 1, -1, -1))
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)  # true rank per slot
        self.widths = {group: tuple(target.shape(m)[1] for m in modules) for group, modules in GROUPS.items()}
        self.a: list[dict[str, torch.Tensor]] = []  # per layer: group -> [S, len(group) * r, in]
        self.b_group: list[dict[str, torch.Tensor]] = []  # per layer: group -> [S, sum of out, r]
        self.b: list[dict[str, torch.Tensor]] = []  # per layer: module -> [S, out, r], a view of b_group
        for _ in range(target.num_layers):
            a_layer, b_group, b_layer = {}, {}, {}
            for group, modules in GROUPS.items():
                d_in = target.shape(modules[0])[0]
                a_layer[group] = torch.zeros(num_slots, len(modules) * max_rank, d_in, dtype=dtype, device=device)
                widths = self.widths[group]
                b_group[group] = torch.zeros(num_slots, sum(widths), max_rank, dtype=dtype, device=device)
                b_layer.update(zip(modules, b_group[group].split(list(widths), dim=1), strict=True))
            self.a.append(a_layer)
            self.b_group.append(b_group)
            self.b.append(b_layer)

    def lookup(self, adapter_id: str) -> int | None:
        """The slot of a resident adapter (now the most recently used), None if it is not on the device."""
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.slot_of.move_to_end(adapter_id)
        return slot

    def activate(self, adapter_id: str, weights: LoRAWeights, in_use: Collection[str]) -> int:
        """The slot holding `adapter_id`, copying it in (evicting an idle one) if it is not resident."""
        if adapter_id in self.slot_of:
            self.slot_of.move_to_end(adapter_id)
            return self.slot_of[adapter_id]
        if not self.free:
            victim = next((a for a in self.slot_of if a not in in_use), None)
            if victim is None:
                raise Overloaded("every adapter slot is in use", num_slots=self.num_slots)
            self.free.append(self.slot_of.pop(victim))
            log.debug("evicted adapter %s from its slot", victim)
        slot = self.free.pop()
        self._write(slot, weights)
        self.slot_of[adapter_id] = slot
        return slot

    def remove(self, adapter_id: str) -> None:
        slot = self.slot_of.pop(adapter_id, None)
        if slot is not None:
            self.free.append(slot)

    def _write(self, slot: int, weights: LoRAWeights) -> None:
        r_max = self.max_rank
        self.ranks[slot] = max((a.shape[0] for a, _ in weights.modules.values()), default=0)
        for layer, (a_layer, b_layer) in enumerate(zip(self.a, self.b, strict=True)):
            for group, modules in GROUPS.items():
                a_layer[group][slot].zero_()
                for g, m in enumerate(modules):
                    b_layer[m][slot].zero_()
                    pair = weights.modules.get((layer, m))
                    if pair is None:
                        continue
                    a, b = pair
                    rank = a.shape[0]
                    a_layer[group][slot, g * r_max: g * r_max + rank].copy_(a)
                    b_layer[m][slot, :, :rank].copy_(b)


class LoRABatch:
    """The `LoRAHook` the model calls: this step's plan over the slots."""

    def __init__(self, slots: LoRASlots, plan: LoRAPlan):
        self.slots, self.plan = slots, plan

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out: [T, sum of the group's out features], the fused output of the group's projections."""
        slots = self.slots
        apply_lora(x, out, slots.a[layer][group], slots.b_group[layer][group], slots.widths[group], slots.ranks,
                   self.plan)
