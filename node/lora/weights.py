"""An adapter's weights in host memory, laid out like a device slot: the stacks a slot copies in one go."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# projections that share an input: one shrink (A) covers a whole group
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",),
}
MODULE_GROUP = {m: (group, g) for group, names in GROUPS.items() for g, m in enumerate(names)}


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter in host memory, laid out like a device slot, float32.

    a[group]:  [num_layers, len(group) * rank, in]  the group's A matrices, module g at rows g * rank
    b[module]: [num_layers, out, rank]  times `b_scale` is the module's B with its LoRA scaling
    So copying an adapter into a slot is one copy per group (A) and per module (B) for all layers.
    The usual adapter has one scaling (alpha / r) for every module: its B stacks stay as the file has
    them and the slot copy multiplies them by `b_scale` on the way in (no pass of its own); adapters
    with per-module scalings have them folded into B, and `b_scale` 1.
    A module of lower rank than `rank`, or with no LoRA in some layer, has zero rows/columns there;
    groups and modules with no LoRA in any layer are absent. `ranks`: (layer, module) -> rank, for the
    pairs the adapter has.
    """

    rank: int  # the largest rank over its modules
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    ranks: dict[tuple[int, str], int]
    b_scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values()))

    @property
    def num_layers(self) -> int:
        return next(iter(self.a.values())).shape[0]

    @cached_property
    def modules(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, module) -> (A [r, in], B [out, r] scaled): for the pairs it has (A a view of its
        stack; B a view too when `b_scale` is 1)."""
        out = {}
        b = self.scaled_b()
        for (layer, module), r in self.ranks.items():
            group, g = MODULE_GROUP[module]
            out[(layer, module)] = (self.a[group][layer, g * self.rank:g * self.rank + r], b[module][layer, :, :r])
        return out

    def scaled_b(self) -> dict[str, torch.Tensor]:
        """module -> B stack [num_layers, out, rank] with its scaling (new tensors unless `b_scale` is 1)."""
        if self.b_scale == 1.0:
            return self.b
        return {m: t * self.b_scale for m, t in self.b.items()}

    @classmethod
    def from_modules(cls, modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                     scales: dict[tuple[int, str], float] | None = None) -> LoRAWeights:
        """Stack (layer, module) -> (A [r, in], B [out, r]) pairs; B is multiplied by its scale, if given."""
        rank = max(a.shape[0] for a, _ in modules.values())
        num_layers = max(layer for layer, _ in modules) + 1
        a_stacks, b_stacks = {}, {}
        for group, names in GROUPS.items():
            present = [m for m in names if any((layer, m) in modules for layer in range(num_layers))]
            if not present:
                continue
            d_in = modules[next(k for k in modules if k[1] in present)][0].shape[1]
            parts = []
            for layer in range(num_layers):
                for m in names:
                    a = modules[(layer, m)][0] if (layer, m) in modules else torch.zeros(0, d_in)
                    parts.append(a)
                    if a.shape[0] < rank:
                        parts.append(torch.zeros(rank - a.shape[0], d_in))
            # [num_layers * len(group) * rank, in] -> [num_layers, len(group) * rank, in]
            a_stacks[group] = torch.cat(parts).float().view(num_layers, len(names) * rank, d_in)
            for m in present:
                b_stacks[m] = _stack_b(modules, m, num_layers, rank, scales or {})
        ranks = {key: a.shape[0] for key, (a, _) in modules.items()}
        return cls(rank=rank, a=a_stacks, b=b_stacks, ranks=ranks)


def _stack_b(modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], module: str,
             num_layers: int, rank: int, scales: dict[tuple[int, str], float]) -> torch.Tensor:
    """[num_layers, out, rank]: the module's B per layer (zero where absent), padded and scaled."""
    d_out = next(b.shape[0] for (_, m), (_, b) in modules.items() if m == module)
    parts = []
    for layer in range(num_layers):
        b = modules[(layer, module)][1] if (layer, module) in modules else torch.zeros(d_out, rank)
        parts.append(b if b.shape[1] == rank else torch.nn.functional.pad(b, (0, rank - b.shape[1])))
    return scale_stack(torch.stack(parts).float(), module, scales)


def scale_stack(stacked: torch.Tensor, module: str, scales: dict[tuple[int, str], float]) -> torch.Tensor:
    """Multiply, in place, each layer of a module's B stack [num_layers, out, r] by its LoRA scaling."""
    num_layers = stacked.shape[0]
    factors = [scales.get((layer, module), 1.0) for layer in range(num_layers)]
    if len(set(factors)) > 1:
        stacked.mul_(torch.tensor(factors, dtype=torch.float32).view(num_layers, 1, 1))
    elif factors[0] != 1.0:
        stacked.mul_(factors[0])
    return stacked
