"""Per-step token -> adapter-slot mapping, turned once per step into the plan every layer reuses."""

from __future__ import annotations

from collections import Counter

import torch

from node.lora.ops import LoRAPlan

CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# Cost of gathering one chunk's weights, in padded token rows. Weight gathers are memory-bound and
# rows are compute; on a CPU one gather costs about as much as tens of rows, on a GPU a few.
GATHER_COST_ROWS = {"cpu": 32.0, "cuda": 4.0}


def choose_chunk_size(group_sizes: list[int], device_type: str) -> int:
    """The chunk size minimising num_chunks * (gather cost + chunk_size): 1 is BGMV, larger is SGMV."""
    gather = GATHER_COST_ROWS.get(device_type, 4.0)
    largest = max(group_sizes)
    best, best_cost = 1, float("inf")
    for size in CHUNK_SIZES:
        num_chunks = sum(-(-n // size) for n in group_sizes)
        cost = num_chunks * (gather + size)
        if cost < best_cost:
            best, best_cost = size, cost
        if size >= largest:
            break
    return best


def build_plan(token_slots: list[int], device: torch.device, chunk_size: int | None = None,
               ) -> LoRAPlan | None:
    """A plan for the tokens that have a slot (>= 0); None when no token uses an adapter."""
    by_slot: dict[int, list[int]] = {}
    for t, s in enumerate(token_slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(t)
    if not by_slot:
        return None
    if chunk_size is None:
        chunk_size = choose_chunk_size([len(v) for v in by_slot.values()], device.type)
    chunk_tokens: list[list[int]] = []
    chunk_slots: list[int] = []
    real_rows: list[int] = []
    real_tokens: list[int] = []
    for slot, tokens in by_slot.items():
        for start in range(0, len(tokens), chunk_size):
            part = tokens[start:start + chunk_size]
            base = len(chunk_tokens) * chunk_size
            real_rows.extend(range(base, base + len(part)))
            real_tokens.extend(part)
            chunk_tokens.append(part + [part[0]] * (chunk_size - len(part)))
            chunk_slots.append(slot)
    def as_tensor(v: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.long).to(device)
    return LoRAPlan(chunk_tokens=as_tensor(chunk_tokens), chunk_slots=as_tensor(chunk_slots),
                    real_rows=as_tensor(real_rows), real_tokens=as_tensor(real_tokens))


def distinct_slots(token_slots: list[int]) -> Counter[int]:
    return Counter(s for s in token_slots if s >= 0)
