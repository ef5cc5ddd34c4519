"""Fused LoRA kernels: shrink and expand of a whole projection group in ONE launch, h kept on chip.

Same shapes and semantics as `node.lora.triton_ops` (read its docstring), without the float32 `h`
tensor in memory, its zeroing, the atomics and the second launch:
    out[t, j] += sum_k b[s(t), j, k] * sum_i a[s(t), g(j)*R + k, i] * x[t, i]     for k < ranks[s(t)]
Each program owns one projection g and a chunk of its output columns: it computes that projection's
rank-r intermediate (registers), then adds B's chunk times it into `out`. The chunks of one token
all recompute the same h (they read A's rows twice or more, from L2): `n_split` trades that for
enough programs to fill the card; `min_programs` picks it (tune on the GPU with bench/gpu.py).

  - gather (decode, `token_slots` [T] int32): grid (T, G, n_split). Slot ids may be global across
    rank pools: `slot_base` is subtracted and ids outside [0, num_slots) are skipped, so one buffer
    of global ids feeds every pool's launch (a CUDA graph captures them, no per-pool id tensors).
  - segment (prefill, `run_table` [runs, 3] int32 of (slot, start, end)): grid (runs, M tiles,
    G * n_split), BLOCK_M tokens of one slot per tile, both products through `tl.dot` in float32
    (tf32 for 16-bit inputs: exact on bf16/fp16 values, and Triton's interpreter multiplies bf16
    tiles wrongly, so the CPU tests run the path the GPU compiles).
Accumulation is float32; `out` is updated in place (each element by one program: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from node.lora.triton_ops import BLOCK_M, _block_r, _check

GATHER_BLOCK_K = 128  # input features per shrink step (one token: a [R, K] tile of A per step)
SEGMENT_BLOCK_K = 32
BLOCK_N = 64  # output columns per expand step
MIN_PROGRAMS = 256  # about two programs per SM on an H100/H200


@triton.jit
def _columns(g, split, cols_per_split, end_0, end_1, end_2):
    """The chunk [c0, c1) of projection g's columns that program `split` owns."""
    lo = tl.where(g == 0, 0, tl.where(g == 1, end_0, end_1))
    hi = tl.where(g == 0, end_0, tl.where(g == 1, end_1, end_2))
    c0 = lo + split * cols_per_split
    return c0, tl.minimum(hi, c0 + cols_per_split)


@triton.jit
def _fused_gather(x_ptr, a_ptr, b_ptr, out_ptr, slot_ptr, rank_ptr, slot_base, num_slots, in_features, max_rank,
                  cols_per_split, end_0, end_1, end_2, stride_x, stride_as, stride_ar, stride_bs, stride_bn,
                  stride_out, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    t, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = tl.load(slot_ptr + t) - slot_base
    c0, c1 = _columns(g, split, cols_per_split, end_0, end_1, end_2)
    if (s >= 0) & (s < num_slots) & (c0 < c1):
        rank = tl.load(rank_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        rows = a_ptr + s.to(tl.int64) * stride_as + (g * max_rank + offs_r)[:, None] * stride_ar
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xv = tl.load(x_ptr + t * stride_x + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            av = tl.load(rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += av.to(tl.float32) * xv[None, :]
        h = tl.sum(acc, axis=1)  # [BLOCK_R] this token's rank-r intermediate of projection g
        b_slot = b_ptr + s.to(tl.int64) * stride_bs
        for n0 in range(c0, c1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < c1
            bv = tl.load(b_slot + offs_n[:, None] * stride_bn + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            y = tl.sum(bv.to(tl.float32) * h[None, :], axis=1)
            o_ptrs = out_ptr + t * stride_out + offs_n
            o = tl.load(o_ptrs, mask=n_mask, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + y).to(o.dtype), mask=n_mask)


@triton.jit
def _fused_segment(x_ptr, a_ptr, b_ptr, out_ptr, run_ptr, rank_ptr, in_features, max_rank, n_split,
                   cols_per_split, end_0, end_1, end_2, stride_x, stride_as, stride_ar, stride_bs, stride_bn,
                   stride_out, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    run, pid_m, pid_gn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, split = pid_gn // n_split, pid_gn % n_split
    s = tl.load(run_ptr + run * 3)
    start = tl.load(run_ptr + run * 3 + 1) + pid_m * BLOCK_M
    end = tl.load(run_ptr + run * 3 + 2)
    c0, c1 = _columns(g, split, cols_per_split, end_0, end_1, end_2)
    if (start < end) & (c0 < c1):
        rank = tl.load(rank_ptr + s)
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask, r_mask = offs_m < end, offs_r < rank
        rows = a_ptr + s.to(tl.int64) * stride_as + (g * max_rank + offs_r)[None, :] * stride_ar
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < in_features
            xv = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            av = tl.load(rows + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_R]
            h += tl.dot(xv, av, input_precision=PRECISION)
        b_slot = b_ptr + s.to(tl.int64) * stride_bs
        for n0 in range(c0, c1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < c1
            bv = tl.load(b_slot + offs_n[None, :] * stride_bn + offs_r[:, None],
                         mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_N]
            y = tl.dot(h, bv, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            o_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
            o_mask = m_mask[:, None] & n_mask[None, :]
            o = tl.load(o_ptrs, mask=o_mask, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + y).to(o.dtype), mask=o_mask)


def _ends(widths: tuple[int, ...]) -> tuple[int, int, int]:
    """Column ends of projections 0..2 (a group of fewer repeats its last end: empty projections)."""
    assert 1 <= len(widths) <= 3, widths
    ends = [sum(widths[:g + 1]) for g in range(len(widths))]
    return tuple(ends + [ends[-1]] * (3 - len(ends)))  # type: ignore[return-value]


def _split(widths: tuple[int, ...], programs: int, min_programs: int | None) -> tuple[int, int]:
    """(n_split, cols_per_split): enough column chunks per projection for about `min_programs`
    (default MIN_PROGRAMS) programs."""
    min_programs = MIN_PROGRAMS if min_programs is None else min_programs
    max_cols = triton.cdiv(max(widths), BLOCK_N)
    n_split = max(1, min(max_cols, triton.cdiv(min_programs, max(1, programs))))
    cols_per_split = triton.cdiv(max_cols, n_split) * BLOCK_N
    return triton.cdiv(max(widths), cols_per_split), cols_per_split


def lora_gather_fused(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      widths: tuple[int, ...], ranks: torch.Tensor, token_slots: torch.Tensor, slot_base: int = 0,
                      min_programs: int | None = None) -> None:
    """BGMV in one launch: out[t] += the delta of slot token_slots[t] - slot_base (outside this pool's
    [0, S): none); token_slots [T] int32 on x's device."""
    _check(x, out, a, b)
    num_tokens, in_features = x.shape
    num_groups = len(widths)
    n_split, cols_per_split = _split(widths, num_tokens * num_groups, min_programs)
    _fused_gather[(num_tokens, num_groups, n_split)](
        x, a, b, out, token_slots, ranks, slot_base, a.shape[0], in_features, b.shape[2], cols_per_split,
        *_ends(widths), x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_R=_block_r(b.shape[2]), BLOCK_K=GATHER_BLOCK_K, BLOCK_N=BLOCK_N)


def lora_segment_fused(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       widths: tuple[int, ...], ranks: torch.Tensor, run_table: torch.Tensor, max_run_len: int,
                       min_programs: int | None = None) -> None:
    """SGMV in one launch: out[start:end] += the delta of slot s for every (s, start, end) of run_table."""
    _check(x, out, a, b)
    in_features = x.shape[1]
    num_groups, num_runs = len(widths), run_table.shape[0]
    m_blocks = triton.cdiv(max_run_len, BLOCK_M)
    n_split, cols_per_split = _split(widths, num_runs * m_blocks * num_groups, min_programs)
    _fused_segment[(num_runs, m_blocks, num_groups * n_split)](
        x, a, b, out, run_table, ranks, in_features, b.shape[2], n_split, cols_per_split, *_ends(widths),
        x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(b.shape[2]), BLOCK_K=SEGMENT_BLOCK_K, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
