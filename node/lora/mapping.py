"""Per-step token -> adapter-slot mapping, turned once per step into the plan every layer reuses."""

from __future__ import annotations

import torch

from node.lora.ops import Form, LoRAPlan

# Rough costs per layer, in microseconds: one run's matmul calls in the segment form (dispatch or
# launch overhead), and copying one token's adapter weights in the gather form. A CPU copies slowly
# and dispatches cheaply; a GPU the other way round.
RUN_COST_US = {"cpu": 40.0, "cuda": 60.0}
GATHER_COST_US_PER_TOKEN = {"cpu": 150.0, "cuda": 0.5}


def choose_form(num_tokens: int, num_runs: int, device_type: str) -> Form:
    segment = num_runs * RUN_COST_US.get(device_type, 60.0)
    gather = num_tokens * GATHER_COST_US_PER_TOKEN.get(device_type, 0.5)
    return "segment" if segment <= gather else "gather"


def build_plan(token_slots: list[int], device: torch.device, form: Form | None = None) -> LoRAPlan | None:
    """A plan for the tokens that have a slot (>= 0); None when no token uses an adapter."""
    tokens = [t for t, s in enumerate(token_slots) if s >= 0]
    if not tokens:
        return None
    runs: list[tuple[int, int, int]] = []
    for t in tokens:
        slot = token_slots[t]
        if runs and runs[-1][0] == slot and runs[-1][2] == t:
            runs[-1] = (slot, runs[-1][1], t + 1)
        else:
            runs.append((slot, t, t + 1))
    chosen = form or choose_form(len(tokens), len(runs), device.type)
    return LoRAPlan(tokens=torch.tensor(tokens, dtype=torch.long).to(device),
                    slots=torch.tensor([token_slots[t] for t in tokens], dtype=torch.long).to(device),
                    runs=tuple(runs), form=chosen)
