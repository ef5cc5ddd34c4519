"""Batched LoRA ops over stacked adapter slots (Punica's BGMV and SGMV): torch reference, Triton on CUDA.

Semantics, for every token t that has an adapter in slot s(t), and each projection g of a group
sharing the input x (q/k/v, or gate/up, or o, or down):
    shrink:  h[t]            = A[s(t)] @ x[t]                A: [num_slots, G * R, in]
    expand:  out[t, cols_g] += B[s(t), cols_g] @ h[t, g-th R] B: [num_slots, sum of out_g, R]
`out` is the group's fused base output [T, sum of out_g]; `widths` are the out_g; R = max_lora_rank
(lower ranks are zero-padded). Tokens without an adapter (slot -1) are untouched.

Two forms (`LoRAPlan.form`), picked per step by `node.lora.mapping`:
  - gather (BGMV): each token gathers its slot's weights. Best with many distinct adapters, and the
    only form a CUDA graph captures (its shapes depend on the batch size alone).
  - segment (SGMV): one matmul per run of consecutive batch tokens sharing a slot, weights read in
    place. The model runner orders tokens by slot so runs are long.
On a CUDA device, when Triton imports, both run as fused Triton kernels (`node.lora.triton_fused`: one
launch per group, shrink and expand together, work proportional to each slot's true rank); otherwise
as the torch code below. (`node.lora.triton_ops` keeps the two-launch kernels: bench/gpu.py's baseline.)
The float32 loop `reference_delta` is the truth all of them are tested against.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch

Form = Literal["gather", "segment"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAPlan:
    tokens: torch.Tensor  # [N] long: the batch tokens that have an adapter (batch order)
    slots: torch.Tensor  # [N] long: the slot of each of them
    runs: tuple[tuple[int, int, int], ...]  # (slot, start, end): consecutive batch tokens of one slot
    form: Form
    token_slots: torch.Tensor  # [T] int32: every batch token's slot, -1 without an adapter (gather kernels)
    run_table: torch.Tensor  # [len(runs), 3] int32: `runs` on the device (segment kernels)
    max_run_len: int
    slot_base: int = 0  # subtracted from `token_slots` by the kernels: a pool's first global id (graphs)


@cache
def triton_available() -> bool:
    """Whether the Triton kernels can be used (Triton is installed); they run on CUDA devices only."""
    return importlib.util.find_spec("triton") is not None


def uses_triton(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available()


def apply_lora(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, widths: tuple[int, ...],
               ranks: torch.Tensor, plan: LoRAPlan) -> None:
    """out[:, cols_g] += B[s][cols_g] @ (A[s] @ x)[g] for every plan token; x: [T, in], out: [T, sum widths]."""
    if uses_triton(x.device):
        apply_lora_triton(x, out, a, b, widths, ranks, plan)
        return
    rank = b.shape[2]
    bs = list(b.split(list(widths), dim=1))  # [S, out_g, R] views
    if plan.form == "segment":
        _segment(x, out, a, bs, plan.runs, rank)
    else:
        _gather(x, out, a, bs, plan, rank)


def apply_lora_triton(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, widths: tuple[int, ...],
                      ranks: torch.Tensor, plan: LoRAPlan) -> None:
    """apply_lora through the fused Triton kernels (CUDA; on the CPU only in Triton's interpreter)."""
    from node.lora import triton_fused  # imported on demand: its kernels are compiled for the device

    if plan.form == "gather":
        triton_fused.lora_gather_fused(x, out, a, b, widths, ranks, plan.token_slots, plan.slot_base)
    else:
        triton_fused.lora_segment_fused(x, out, a, b, widths, ranks, plan.run_table, plan.max_run_len)


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
