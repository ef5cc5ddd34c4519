"""Batched LoRA ops over stacked adapter slots (Punica's BGMV and SGMV, in torch).

Semantics, for every token t that has an adapter in slot s(t), and each projection m of a group
sharing the input x (q/k/v, or gate/up, or o, or down):
    shrink:  h[t]       = A[s(t)] @ x[t]            A: [num_slots, G * r, in]   (G projections stacked)
    expand:  out_m[t]  += B_m[s(t)] @ h[t, m-th r]  B_m: [num_slots, out_m, r]
`out` is the group's fused base output [T, sum of out_m]. Tokens without an adapter are absent from the
plan and their rows are untouched.

Two forms (`LoRAPlan.form`), picked per step by `node.lora.mapping`:
  - gather (BGMV): each token gathers its slot's weights; one batched matmul for the whole batch, no
    Python loop, weights copied once per token. Best on a GPU with many distinct adapters.
  - segment (SGMV): one matmul per run of consecutive batch tokens sharing a slot, reading inputs,
    weights and outputs in place (no copies). The model runner orders tokens by slot so runs are long.
The float32 loop `reference_delta` is the truth both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["gather", "segment"]


@dataclass(frozen=True)
class LoRAPlan:
    tokens: torch.Tensor  # [N] long: the batch tokens that have an adapter (batch order)
    slots: torch.Tensor  # [N] long: the slot of each of them
    runs: tuple[tuple[int, int, int], ...]  # (slot, start, end): consecutive batch tokens of one slot
    form: Form


def apply_lora(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
               plan: LoRAPlan) -> None:
    """out[:, m-th columns] += B_m[s] @ (A[s] @ x) for every plan token; x: [T, in], out: [T, sum out_m]."""
    rank = a.shape[1] // len(bs)
    if plan.form == "segment":
        _segment(x, out, a, bs, plan.runs, rank)
    else:
        _gather(x, out, a, bs, plan, rank)


def _segment(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor],
             runs: tuple[tuple[int, int, int], ...], rank: int) -> None:
    for slot, start, end in runs:
        h = torch.mm(x[start:end], a[slot].t())  # [n, G * r]
        offset = 0
        for g, b in enumerate(bs):
            width = b.shape[1]
            out[start:end, offset:offset + width].addmm_(h[:, g * rank:(g + 1) * rank], b[slot].t())
            offset += width


def _gather(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], plan: LoRAPlan,
            rank: int) -> None:
    xs = x.index_select(0, plan.tokens)  # [N, in]
    h = torch.bmm(a.index_select(0, plan.slots), xs.unsqueeze(-1))  # [N, G * r, 1]
    ys = [torch.bmm(b.index_select(0, plan.slots), h[:, g * rank:(g + 1) * rank]).squeeze(-1)  # [N, out_m]
          for g, b in enumerate(bs)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)  # [N, sum out_m]
    out.index_add_(0, plan.tokens, y.to(out.dtype))


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: list[int],
                    ) -> torch.Tensor:
    """The float32 loop: delta[t] = B[s] @ (A[s] @ x[t]) for one projection, zero without a slot."""
    delta = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for t, s in enumerate(token_slots):
        if s >= 0:
            delta[t] = b[s].float() @ (a[s].float() @ x[t].float())
    return delta
