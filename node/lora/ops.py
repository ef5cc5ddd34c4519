"""Batched LoRA shrink/expand ops over stacked adapter slots (Punica's BGMV and SGMV, in torch).

Semantics, for every token t that has an adapter in slot s(t):
    shrink:  h[t]  = A[s(t)] @ x[t]          A: [num_slots, r, in],  x: [T, in]  -> h: [r]
    expand:  y[t]  = B[s(t)] @ h[t]          B: [num_slots, out, r]             -> y: [out]
    add:     out[t] += y[t]
Tokens without an adapter are absent from the plan: their rows of `out` are untouched.

Two forms share one plan (`LoRAPlan`), which lists the adapter tokens sorted by slot:
  - gather (BGMV): every token gathers its own slot's weights, one batched matmul for the whole
    batch. No Python loop; copies the weights once per token: best on a GPU with many distinct adapters.
  - segment (SGMV): one matmul per run of tokens sharing a slot, reading the slot's weights in place.
    One call per segment; no weight copies: best with few segments, and on a CPU throughout.
`node.lora.mapping` picks the form per step. The float32 loop `reference_delta` is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["gather", "segment"]


@dataclass(frozen=True)
class LoRAPlan:
    tokens: torch.Tensor  # [N] long: the batch tokens that have an adapter, sorted by slot
    slots: torch.Tensor  # [N] long: the slot of each of them
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end): runs of one slot in `tokens`
    form: Form


def shrink(x: torch.Tensor, a: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
    """x: [T, in], a: [num_slots, r, in] -> h: [N, r] for the plan's tokens."""
    xs = x.index_select(0, plan.tokens)  # [N, in]
    if plan.form == "gather":
        a_sel = a.index_select(0, plan.slots)  # [N, r, in]
        return torch.bmm(a_sel, xs.unsqueeze(-1)).squeeze(-1)
    h = xs.new_empty((xs.shape[0], a.shape[1]))
    for slot, start, end in plan.segments:
        torch.mm(xs[start:end], a[slot].t(), out=h[start:end])
    return h


def expand(h: torch.Tensor, b: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
    """h: [N, r], b: [num_slots, out, r] -> y: [N, out]."""
    if plan.form == "gather":
        b_sel = b.index_select(0, plan.slots)  # [N, out, r]
        return torch.bmm(b_sel, h.unsqueeze(-1)).squeeze(-1)
    y = h.new_empty((h.shape[0], b.shape[1]))
    for slot, start, end in plan.segments:
        torch.mm(h[start:end], b[slot].t(), out=y[start:end])
    return y


def add_delta(out: torch.Tensor, y: torch.Tensor, plan: LoRAPlan) -> None:
    """out[t] += y[i] for the i-th plan token t (each token appears once). `out` may be a column slice."""
    out.index_add_(0, plan.tokens, y.to(out.dtype))


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: list[int],
                    ) -> torch.Tensor:
    """The float32 loop the ops are tested against: delta[t] = B[s] @ (A[s] @ x[t]), zero without slot."""
    delta = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for t, s in enumerate(token_slots):
        if s >= 0:
            delta[t] = b[s].float() @ (a[s].float() @ x[t].float())
    return delta
