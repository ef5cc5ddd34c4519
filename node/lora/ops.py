"""Batched LoRA shrink/expand ops over stacked adapter slots (Punica's BGMV and SGMV, in torch).

Semantics, for every token t that has an adapter in slot s(t):
    shrink:  h[t]  = A[s(t)] @ x[t]          A: [num_slots, r, in],  x: [T, in]  -> h: [r]
    expand:  y[t] += B[s(t)] @ h[t]          B: [num_slots, out, r]             -> y: [T, out]
Tokens without an adapter are simply absent from the plan: their rows of y are untouched.

Two forms share one plan (`LoRAPlan`): tokens are cut into chunks of `chunk_size` tokens that all use
one slot; each chunk gathers its slot's A and B once and runs a small batched matmul.
  - gather form (BGMV): chunk_size 1, one chunk per token, no sorting or padding;
  - segmented form (SGMV): tokens grouped by slot, chunks of up to chunk_size rows (padded).
`node.lora.mapping` picks the chunk size per step. The float32 loop `reference_delta` is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAPlan:
    chunk_tokens: torch.Tensor  # [num_chunks, chunk_size] long: flat token index (pads repeat a real one)
    chunk_slots: torch.Tensor  # [num_chunks] long: the slot every token of the chunk uses
    real_rows: torch.Tensor  # [num_real] long: positions in the flattened [num_chunks * chunk_size] rows
    real_tokens: torch.Tensor  # [num_real] long: the token each real row belongs to

    @property
    def chunk_size(self) -> int:
        return self.chunk_tokens.shape[1]


def shrink(x: torch.Tensor, a: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
    """x: [T, in], a: [num_slots, r, in] -> [num_chunks, chunk_size, r]."""
    xs = x[plan.chunk_tokens]  # [N, C, in]
    a_sel = a.index_select(0, plan.chunk_slots)  # [N, r, in]
    return torch.bmm(xs, a_sel.transpose(1, 2))


def expand(h: torch.Tensor, b: torch.Tensor, plan: LoRAPlan) -> torch.Tensor:
    """h: [N, C, r], b: [num_slots, out, r] -> rows [num_real, out] for `plan.real_tokens`."""
    b_sel = b.index_select(0, plan.chunk_slots)  # [N, out, r]
    y = torch.bmm(h, b_sel.transpose(1, 2))  # [N, C, out]
    return y.flatten(0, 1).index_select(0, plan.real_rows)  # [num_real, out]


def add_delta(out: torch.Tensor, rows: torch.Tensor, plan: LoRAPlan) -> None:
    """out[t] += rows[i] for the i-th real token t (each token appears once)."""
    out.index_add_(0, plan.real_tokens, rows.to(out.dtype))


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: list[int],
                    ) -> torch.Tensor:
    """The float32 loop the ops are tested against: delta[t] = B[s] @ (A[s] @ x[t]), zero without slot."""
    delta = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for t, s in enumerate(token_slots):
        if s >= 0:
            delta[t] = b[s].float() @ (a[s].float() @ x[t].float())
    return delta
