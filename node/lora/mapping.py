"""Per-step token -> adapter-slot mapping, turned once per step into the plan every layer reuses."""

from __future__ import annotations

import torch

from node.lora.ops import Form, LoRAPlan, uses_triton

# Rough costs per layer of the torch ops, in microseconds: one run's matmul calls in the segment form
# (dispatch or launch overhead), and copying one token's adapter weights in the gather form. A CPU
# copies slowly and dispatches cheaply; a GPU the other way round.
RUN_COST_US = {"cpu": 40.0, "cuda": 60.0}
GATHER_COST_US_PER_TOKEN = {"cpu": 150.0, "cuda": 0.5}
# The Triton kernels launch once per form whatever the runs: segment tiles of 16 tokens read a slot's
# weights once per tile, so they pay off once runs average half a tile.
TRITON_MIN_MEAN_RUN = 8


def choose_form(num_tokens: int, num_runs: int, device_type: str, is_triton: bool = False) -> Form:
    if is_triton:
        return "segment" if num_tokens >= TRITON_MIN_MEAN_RUN * num_runs else "gather"
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
    chosen = form or choose_form(len(tokens), len(runs), device.type, uses_triton(device))
    return LoRAPlan(tokens=torch.tensor(tokens, dtype=torch.long).to(device),
                    slots=torch.tensor([token_slots[t] for t in tokens], dtype=torch.long).to(device),
                    runs=tuple(runs), form=chosen,
                    token_slots=torch.tensor(token_slots, dtype=torch.int32).to(device),
                    run_table=torch.tensor(runs, dtype=torch.int32).reshape(-1, 3).to(device),
                    max_run_len=max(end - start for _, start, end in runs))
