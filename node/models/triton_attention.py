"""Paged decode attention in Triton: one query per sequence, K and V read in place from the paged cache.

Shapes (B sequences, H query heads, KVH cache heads, G = H // KVH, D head dim, bs block size):
    q:            [B, H, D]                    this step's query of each sequence (bf16, fp16 or fp32)
    k/v cache:    [num_blocks, bs, KVH, D]     the layout `node.models.attention` writes
    block_tables: [B, max_blocks] int          cache block of each sequence's logical block
    context_lens: [B] int32                    cached positions, this step's key included (>= 1)
    out:          [B, H * D]                   in q's dtype

out[b, h] = sum_j softmax_j(s_j) * v[b, j, h // G], over the keys j < context_lens[b] (and, with a
window w, j > context_lens[b] - 1 - w), where s_j = scale * q[b, h] . k[b, j, h // G], soft-capped as
cap * tanh(s_j / cap) when a cap is given (Gemma 2: the scaled score, then the cap, then the softmax).

Split-K (flash-decoding): the keys of a sequence are cut into `num_splits` ranges; one program per
(sequence, cache head, range) walks its range in tiles of BLOCK_N keys with an online softmax, all G
query heads of the cache head at once (one `tl.dot` per tile: K and V are read once per cache head).
Each key's cache block comes from the block table (any block size; no gathered copy). A second
kernel merges the ranges' float32 partials (max, sum, weighted values). The split count comes from
the shapes alone, so a CUDA graph captures the pair.

Tiles are multiplied in float32 (tf32 for 16-bit caches: exact on the cached bf16/fp16 values, the
probabilities rounded to tf32, float32 sums): decode is bound by reading the cache, not by the dot,
and Triton's interpreter multiplies bf16 tiles wrongly (it reads their bits as integers), so the
path the CPU tests run is the one the GPU compiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile
MIN_GROUP = 16  # query heads per program are padded to this (the least `tl.dot` takes)
TARGET_PROGRAMS = 1024  # splits are added until the grid has about this many programs
MAX_SPLITS = 32
NO_WINDOW = 1 << 30  # the window of a layer without one: every cached key is inside it


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, acc_ptr, m_ptr, l_ptr, scale, softcap, window,
                    tiles_per_split, block_size, num_splits, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_tb, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    first_key = tl.maximum(ctx - window, 0)  # no window: window is past any context
    offs_g, offs_d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < GROUP, offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    tile_start = tl.maximum(split * tiles_per_split, first_key // BLOCK_N)
    tile_end = tl.minimum((split + 1) * tiles_per_split, tl.cdiv(ctx, BLOCK_N))
    for tile in range(tile_start, tile_end):
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos < ctx) & (pos >= first_key)
        block = tl.load(table_ptr + b * stride_tb + pos // block_size, mask=valid, other=0).to(tl.int64)
        offset = pos % block_size
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kvh * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # cap * tanh(s / cap)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile in range holds a valid key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kvh * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    row = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [B, H, S] flat
    tl.store(m_ptr + row, m, mask=g_mask)
    tl.store(l_ptr + row, l_sum, mask=g_mask)
    tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge(acc_ptr, m_ptr, l_ptr, out_ptr, stride_ob, num_splits, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < num_splits, offs_d < HEAD_DIM
    rows = (b * tl.num_programs(1) + h) * num_splits + offs_s
    m = tl.load(m_ptr + rows, mask=s_mask, other=float("-inf"))  # empty ranges hold -inf: weight 0
    weight = tl.exp(m - tl.max(m, axis=0))
    total = tl.sum(tl.load(l_ptr + rows, mask=s_mask, other=0.0) * weight, axis=0)
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + b * stride_ob + h * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def num_splits(num_seqs: int, num_kv_heads: int, max_keys: int) -> int:
    """Key ranges per sequence: enough programs to fill the card, from shapes alone (graph-safe)."""
    wanted = TARGET_PROGRAMS // max(1, num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_keys, BLOCK_N), MAX_SPLITS))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, softcap: float | None = None,
                 window: int | None = None) -> torch.Tensor:
    """q [B, H, D] -> [B, H * D]: each sequence's query attends its cached keys in place (module docstring)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head dims must be contiguous"
    assert context_lens.dtype == torch.int32 and context_lens.shape == (num_seqs,)
    group = num_heads // num_kv_heads
    splits = num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size)
    tiles = triton.cdiv(block_tables.shape[1] * block_size, BLOCK_N)
    acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    block_d = max(MIN_GROUP, triton.next_power_of_2(head_dim))  # `tl.dot` needs 16 along each side
    _decode_partial[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, m, l_sum, scale, softcap or 1.0, window or NO_WINDOW,
        triton.cdiv(tiles, splits), block_size, splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_G=max(MIN_GROUP, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=BLOCK_N, USE_SOFTCAP=softcap is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8 if block_d >= 128 else 4)
    out = q.new_empty(num_seqs, num_heads * head_dim)
    _decode_merge[(num_seqs, num_heads)](acc, m, l_sum, out, out.stride(0), splits, HEAD_DIM=head_dim,
                                         BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits))
    return out
