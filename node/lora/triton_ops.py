"""Triton kernels for the batched LoRA ops (Punica's BGMV and SGMV), honoring each slot's true rank.

Shapes (S slots, R = max_lora_rank, G projections sharing one input, T batch tokens, N = sum of the
group's out features, widths = (out_0, ..., out_{G-1})):
    x:     [T, in]        the group's input, contiguous rows (bf16, fp16 or fp32)
    a:     [S, G * R, in] stacked A: projection g of slot s is rows g*R .. g*R + ranks[s] - 1
    b:     [S, N, R]      stacked B: columns offset_g .. offset_g + out_g - 1 belong to projection g;
                          only its first ranks[s] columns of the last dimension are read
    ranks: [S] int32      each slot's true rank (<= R): work is proportional to it, padding is skipped
    h:     [T, G * R] fp32, the shrink output: only h[t, g*R : g*R + ranks[s(t)]] is defined
    out:   [T, N]         the group's fused base output, row stride free, column stride 1

shrink:  h[t, g*R + k] = sum_i a[s(t), g*R + k, i] * x[t, i]               for k < ranks[s(t)]
expand:  out[t, j]    += sum_k b[s(t), j, k] * h[t, g(j)*R + k]           for k < ranks[s(t)]
where g(j) is the projection owning column j. Tokens without an adapter (slot -1) are untouched.

Two forms, picked per step (`node.lora.mapping`):
  - gather (BGMV, decode): `token_slots` [T] int32, -1 for base-only rows; one program per (token,
    block); every token reads its slot's weights (tokens ordered by slot share them through L2). Its
    shapes depend on T alone, so CUDA graphs capture it.
  - segment (SGMV, prefill): `run_table` [num_runs, 3] int32 of (slot, start, end), consecutive batch
    tokens sharing a slot; one program per (run, BLOCK_M tokens, block), weights read once per tile
    through `tl.dot`.
Accumulation is float32; `out` is updated in place, rounded once to its dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # input features per step of the shrink loop
BLOCK_N = 64  # output features per expand program
BLOCK_M = 16  # tokens per segment tile (the least `tl.dot` takes)
MIN_PROGRAMS = 512  # the gather shrink splits its K loop until the grid has about this many programs


@triton.jit
def _shrink_gather(x_ptr, a_ptr, h_ptr, slot_ptr, rank_ptr, in_features, max_rank, k_per_split,
                   stride_x, stride_as, stride_ar, stride_h, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(slot_ptr + t)
    if s >= 0:
        rank = tl.load(rank_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        rows = a_ptr + s.to(tl.int64) * stride_as + (g * max_rank + offs_r)[:, None] * stride_ar
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):  # k_per_split: a multiple of BLOCK_K
            offs_k = split * k_per_split + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xv = tl.load(x_ptr + t * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.atomic_add(h_ptr + t * stride_h + g * max_rank + offs_r, acc, mask=r_mask)


@triton.jit
def _expand_gather(h_ptr, b_ptr, out_ptr, slot_ptr, rank_ptr, num_cols, max_rank, end_0, end_1,
                   stride_h, stride_bs, stride_bn, stride_out, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t, pid_n = tl.program_id(0), tl.program_id(1)
    s = tl.load(slot_ptr + t)
    if s >= 0:
        rank = tl.load(rank_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < num_cols
        r_mask = offs_r < rank
        group = (offs_n >= end_0).to(tl.int32) + (offs_n >= end_1).to(tl.int32)  # g(j) of each column
        mask = n_mask[:, None] & r_mask[None, :]
        hv = tl.load(h_ptr + t * stride_h + (group * max_rank)[:, None] + offs_r[None, :], mask=mask, other=0.0)
        bv = tl.load(b_ptr + s.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                     mask=mask, other=0.0)
        y = tl.sum(bv.to(tl.float32) * hv, axis=1)  # [BLOCK_N]
        o_ptrs = out_ptr + t * stride_out + offs_n
        o = tl.load(o_ptrs, mask=n_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + y).to(o.dtype), mask=n_mask)


@triton.jit
def _shrink_segment(x_ptr, a_ptr, h_ptr, run_ptr, rank_ptr, in_features, max_rank, stride_x, stride_as,
                    stride_ar, stride_h, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    run, pid_m, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(run_ptr + run * 3)
    start = tl.load(run_ptr + run * 3 + 1) + pid_m * BLOCK_M
    end = tl.load(run_ptr + run * 3 + 2)
    if start < end:
        rank = tl.load(rank_ptr + s)
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask = offs_m < end
        r_mask = offs_r < rank
        rows = a_ptr + s.to(tl.int64) * stride_as + (g * max_rank + offs_r)[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xv = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            av = tl.load(rows + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [K, R]
            acc += tl.dot(xv, av.to(xv.dtype), input_precision=PRECISION)
        h_ptrs = h_ptr + offs_m[:, None] * stride_h + g * max_rank + offs_r[None, :]
        tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_segment(h_ptr, b_ptr, out_ptr, run_ptr, rank_ptr, num_cols, max_rank, end_0, end_1, stride_h,
                    stride_bs, stride_bn, stride_out, NUM_GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    run, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(run_ptr + run * 3)
    start = tl.load(run_ptr + run * 3 + 1) + pid_m * BLOCK_M
    end = tl.load(run_ptr + run * 3 + 2)
    if start < end:
        rank = tl.load(rank_ptr + s)
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask, n_mask, r_mask = offs_m < end, offs_n < num_cols, offs_r < rank
        group = (offs_n >= end_0).to(tl.int32) + (offs_n >= end_1).to(tl.int32)
        bv = tl.load(b_ptr + s.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            hv = tl.load(h_ptr + offs_m[:, None] * stride_h + g * max_rank + offs_r[None, :],
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
            part = tl.dot(hv, bv, input_precision="ieee")
            y = tl.where((group == g)[None, :], part, y)
        o_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
        o_mask = m_mask[:, None] & n_mask[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + y).to(o.dtype), mask=o_mask)


def _group_ends(widths: tuple[int, ...]) -> tuple[int, int]:
    """Column ends of projections 0 and 1 (past the last column when the group has fewer)."""
    assert 1 <= len(widths) <= 3, widths
    ends = [sum(widths[:g + 1]) for g in range(len(widths))]
    big = ends[-1] + 1
    return (ends[0] if len(ends) > 1 else big), (ends[1] if len(ends) > 2 else big)


def _check(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    assert x.stride(1) == 1 and out.stride(1) == 1, "rows must be contiguous"
    assert a.stride(2) == 1 and b.stride(2) == 1 and b.stride(1) == b.shape[2], "stacked weights contiguous"


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def lora_gather(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                widths: tuple[int, ...], ranks: torch.Tensor, token_slots: torch.Tensor) -> None:
    """BGMV: out[t] += the delta of slot token_slots[t] (-1: none); token_slots [T] int32 on x's device."""
    _check(x, out, a, b)
    num_tokens, in_features = x.shape
    max_rank = b.shape[2]
    num_groups = len(widths)
    block_r = _block_r(max_rank)
    h = torch.zeros(num_tokens, num_groups * max_rank, dtype=torch.float32, device=x.device)
    num_k_blocks = triton.cdiv(in_features, BLOCK_K)
    split = max(1, min(num_k_blocks, MIN_PROGRAMS // max(1, num_tokens * num_groups)))
    k_per_split = triton.cdiv(num_k_blocks, split) * BLOCK_K
    split = triton.cdiv(in_features, k_per_split)
    _shrink_gather[(num_tokens, num_groups, split)](
        x, a, h, token_slots, ranks, in_features, max_rank, k_per_split, x.stride(0), a.stride(0), a.stride(1),
        h.stride(0), BLOCK_R=block_r, BLOCK_K=BLOCK_K)
    end_0, end_1 = _group_ends(widths)
    num_cols = sum(widths)
    _expand_gather[(num_tokens, triton.cdiv(num_cols, BLOCK_N))](
        h, b, out, token_slots, ranks, num_cols, max_rank, end_0, end_1, h.stride(0), b.stride(0), b.stride(1),
        out.stride(0), BLOCK_N=BLOCK_N, BLOCK_R=block_r)


def lora_segment(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 widths: tuple[int, ...], ranks: torch.Tensor, run_table: torch.Tensor, max_run_len: int) -> None:
    """SGMV: out[start:end] += the delta of slot s for every (s, start, end) row of run_table [R, 3] int32."""
    _check(x, out, a, b)
    num_tokens, in_features = x.shape
    max_rank = b.shape[2]
    num_groups = len(widths)
    block_r = _block_r(max_rank)
    num_runs = run_table.shape[0]
    m_blocks = triton.cdiv(max_run_len, BLOCK_M)
    h = torch.empty(num_tokens, num_groups * max_rank, dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    _shrink_segment[(num_runs, m_blocks, num_groups)](
        x, a, h, run_table, ranks, in_features, max_rank, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K, PRECISION=precision)
    end_0, end_1 = _group_ends(widths)
    num_cols = sum(widths)
    _expand_segment[(num_runs, m_blocks, triton.cdiv(num_cols, BLOCK_N))](
        h, b, out, run_table, ranks, num_cols, max_rank, end_0, end_1, h.stride(0), b.stride(0), b.stride(1),
        out.stride(0), NUM_GROUPS=num_groups, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=block_r)
