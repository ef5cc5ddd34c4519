"""Per-step token -> adapter-slot mapping, turned once per step into the plan every layer reuses."""

from __future__ import annotations

import torch

from node.lora.ops import Form, LoRAPlan

# Relative costs, in microseconds per layer, of one segment's matmul calls (launch or dispatch
# overhead) and of copying one token's adapter weights for the gather form. A CPU copies slowly and
# dispatches cheaply; a GPU the other way round.
SEGMENT_COST_US = {"cpu": 40.0, "cuda": 60.0}
GATHER_COST_US_PER_TOKEN = {"cpu": 150.0, "cuda": 0.5}


def choose_form(num_tokens: int, num_segments: int, device_type: str) -> Form:
    segment = num_segments * SEGMENT_COST_US.get(device_type, 60.0)
    gather = num_tokens * GATHER_COST_US_PER_TOKEN.get(device_type, 0.5)
    return "segment" if segment <= gather else "gather"


def build_plan(token_slots: list[int], device: torch.device, form: Form | None = None) -> LoRAPlan | None:
    """A plan for the tokens that have a slot (>= 0); None when no token uses an adapter."""
    order = sorted((s, t) for t, s in enumerate(token_slots) if s >= 0)
    if not order:
        return None
    segments: list[tuple[int, int, int]] = []
    for i, (slot, _) in enumerate(order):
        if segments and segments[-1][0] == slot:
            segments[-1] = (slot, segments[-1][1], i + 1)
        else:
            segments.append((slot, i, i + 1))
    chosen = form or choose_form(len(order), len(segments), device.type)
    tokens = torch.tensor([t for _, t in order], dtype=torch.long).to(device)
    slots = torch.tensor([s for s, _ in order], dtype=torch.long).to(device)
    return LoRAPlan(tokens=tokens, slots=slots, segments=tuple(segments), form=chosen)
