"""Attention over a paged KV cache through `scaled_dot_product_attention`.

The tokens of one step are flattened ([num_tokens, ...]). Sequences are attended in groups of
similar query length (the prefill group and the decode group) so that padding stays small: each
group gathers its sequences' KV blocks into a padded [batch, max_len] view and runs one SDPA call.
The metadata is built once per step by the engine and reused in every layer.

A dense decode group (one query per sequence, every row real, the batch in order: what a CUDA graph
replays) has fixed shapes end to end. On CUDA it attends the paged cache in place: through flash-attn
(`flash_attn_with_kvcache`) when it is installed and the block size is a multiple of its page size
(256), else through our Triton kernel (`node.models.triton_attention`, any block size); on the CPU,
SDPA over the gathered blocks.

Per layer, two options (`LayerAttention`): a sliding window (query i sees keys i - window < j <= i,
transformers' rule; keys that fell out of the window stay in the cache and are masked) and
attention-logit soft-capping (scores -> cap * tanh(scores / cap), Gemma 2). SDPA has no soft-cap, so
soft-capped layers attend through `_softcapped` (the same mask, in plain tensor ops: CUDA graphs
capture it); flash-attn takes both as arguments (soft-capping from flash-attn 2.6; before it, those
layers take the Triton kernel, which does both).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

FLASH_PAGE_SIZE = 256  # flash-attn's paged KV needs blocks of a multiple of this many tokens


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor  # [B, Q] long: flat token index of each query (pads point at token 0)
    is_real: torch.Tensor  # [B, Q] bool: False on padded query rows
    block_tables: torch.Tensor  # [B, max_blocks] long: KV cache block ids (pads: any valid id)
    mask: torch.Tensor  # [B, 1, Q, K] bool: True where a query may attend a cached position
    num_keys: int  # K: positions to gather per sequence
    query_pos: torch.Tensor  # [B, Q] long: each query's position in its sequence (the last key it sees)
    context_lens: torch.Tensor | None = None  # [B] int32 cached positions per sequence (dense groups)
    is_dense: bool = False  # one query per sequence, token b is sequence b: no scatter, fixed shapes


@cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def flash_has_softcap() -> bool:
    """flash-attn >= 2.6 soft-caps scores itself; an older one leaves soft-capped layers to SDPA's gather path."""
    import inspect

    from flash_attn import flash_attn_with_kvcache

    return "softcap" in inspect.signature(flash_attn_with_kvcache).parameters


def decode_backend(device: torch.device, block_size: int) -> str:
    """How a dense decode group attends: "flash" (flash-attn's paged KV) where it can run, else
    "triton" (our paged kernel) on CUDA, else "sdpa" (the gather path: the CPU)."""
    if device.type != "cuda":
        return "sdpa"
    if flash_attn_installed() and block_size % FLASH_PAGE_SIZE == 0:
        return "flash"
    return "triton" if triton_installed() else "sdpa"


def dense_decode_group(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                       ) -> AttentionGroup:
    """The decode group of a padded batch from device tensors alone (block_tables [B, max_blocks] long,
    context_lens [B] int32): no host data, so a CUDA graph can capture it."""
    num_seqs, max_blocks = block_tables.shape
    num_keys = max_blocks * block_size
    k_pos = torch.arange(num_keys, device=block_tables.device)
    mask = (k_pos[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, K]
    token_index = torch.arange(num_seqs, device=block_tables.device)[:, None]  # [B, 1]
    return AttentionGroup(token_index=token_index, is_real=torch.ones_like(token_index, dtype=torch.bool),
                          block_tables=block_tables, mask=mask, num_keys=num_keys,
                          query_pos=(context_lens.long() - 1)[:, None], context_lens=context_lens, is_dense=True)


@dataclass(frozen=True)
class AttentionBatch:
    kv_indices: torch.Tensor  # [num_tokens] long: KV cache index (block * block_size + offset) per token
    groups: tuple[AttentionGroup, ...]


def build_group(
    query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], first_token: int,
    device: torch.device,
) -> AttentionGroup:
    """A group of sequences whose new tokens are consecutive in the flat batch from `first_token`.

    Sequence b has `context_lens[b]` tokens in the cache once this step's keys are written, the last
    `query_lens[b]` of them being this step's queries (causal within them).
    """
    num_seqs, max_q, max_k = len(query_lens), max(query_lens), max(context_lens)
    max_blocks = max(len(t) for t in block_tables)
    q_lens = torch.tensor(query_lens, device=device)
    k_lens = torch.tensor(context_lens, device=device)
    starts = torch.tensor([0, *query_lens[:-1]], device=device).cumsum(0) + first_token
    q_pos = torch.arange(max_q, device=device)
    is_real = q_pos[None, :] < q_lens[:, None]  # [B, Q]
    token_index = torch.where(is_real, starts[:, None] + q_pos[None, :], 0)
    k_pos = torch.arange(max_k, device=device)
    last_visible = (k_lens - q_lens)[:, None] + q_pos[None, :]  # [B, Q]: query i sees keys <= this
    mask = k_pos[None, None, :] <= last_visible[:, :, None]  # [B, Q, K]
    mask = mask | ~is_real[:, :, None]  # padded rows see everything: no NaN, results dropped
    tables = torch.zeros((num_seqs, max_blocks), dtype=torch.long)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.long)
    return AttentionGroup(token_index=token_index, is_real=is_real, block_tables=tables.to(device),
                          mask=mask.unsqueeze(1), num_keys=max_k, query_pos=last_visible)


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention does beyond causal softmax attention."""

    scale: float
    window: int | None = None  # sliding window: query i sees keys i - window < j <= i
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap)


def window_mask(group: AttentionGroup, window: int) -> torch.Tensor:
    """[B, 1, Q, K] bool: the group's causal mask, limited to each query's last `window` keys
    (padded query rows keep seeing everything, as in the causal mask)."""
    k_pos = torch.arange(group.mask.shape[-1], device=group.mask.device)
    inside = k_pos[None, None, :] > group.query_pos[:, :, None] - window  # [B, Q, K]
    return group.mask & (inside | ~group.is_real[:, :, None]).unsqueeze(1)


def _dense_backend(device: torch.device, block_size: int, layer: LayerAttention) -> str:
    """`decode_backend`, less flash for a soft-capped layer when flash-attn predates soft-capping."""
    backend = decode_backend(device, block_size)
    if backend == "flash" and layer.softcap is not None and not flash_has_softcap():
        return "triton" if triton_installed() else "sdpa"
    return backend


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    batch: AttentionBatch, layer: LayerAttention,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D], caches: [num_blocks, block_size, KVH, D] -> [T, H * D].

    Writes this step's keys and values into the cache, then attends every group.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.kv_indices, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.kv_indices, v)
    out = q.new_empty((num_tokens, num_heads * head_dim))
    for group in batch.groups:
        backend = _dense_backend(q.device, k_cache.shape[1], layer) if group.is_dense else "sdpa"
        if backend == "flash":
            return _flash_decode(q, k_cache, v_cache, group, layer)
        if backend == "triton":
            from node.models.triton_attention import paged_decode  # Triton: imported where it runs

            assert group.context_lens is not None
            return paged_decode(q, k_cache, v_cache, group.block_tables, group.context_lens, layer.scale,
                                softcap=layer.softcap, window=layer.window)
        qg = q[group.token_index].transpose(1, 2)  # [B, H, Q, D]
        kg = _gather(k_cache, group).transpose(1, 2)  # [B, KVH, K, D]
        vg = _gather(v_cache, group).transpose(1, 2)
        mask = group.mask if layer.window is None else window_mask(group, layer.window)
        if layer.softcap is None:
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=layer.scale,
                                                enable_gqa=num_heads != num_kv_heads)
        else:
            og = _softcapped(qg, kg, vg, mask, layer.scale, layer.softcap)
        og = og.transpose(1, 2).flatten(2)  # [B, Q, H * D]
        if group.is_dense:
            return og.reshape(num_tokens, num_heads * head_dim)
        out[group.token_index[group.is_real]] = og[group.is_real]
    return out


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                softcap: float) -> torch.Tensor:
    """q: [B, H, Q, D], k/v: [B, KVH, K, D], mask: [B, 1, Q, K] -> [B, H, Q, D]: attention whose scaled
    scores are soft-capped before the mask and the float32 softmax (transformers' eager order)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, K, D]
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, Q, K]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup,
                  layer: LayerAttention) -> torch.Tensor:
    from flash_attn import flash_attn_with_kvcache

    extra: dict[str, object] = {}
    if layer.window is not None:
        extra["window_size"] = (layer.window - 1, 0)  # keys i - (window - 1) .. i
    if layer.softcap is not None:
        extra["softcap"] = layer.softcap  # flash-attn >= 2.6
    out: torch.Tensor = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=group.context_lens,
                                                block_table=group.block_tables.to(torch.int32),
                                                softmax_scale=layer.scale, causal=True, **extra)  # [B, 1, H, D]
    return out.reshape(q.shape[0], -1)


def _gather(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[B, K, KVH, D]: each sequence's cached positions 0..K-1, read through its block table."""
    num_seqs, max_blocks = group.block_tables.shape
    # rows of a 2-d view: torch copies each block as one row (index_select over the 4-d cache takes
    # a per-element path, 5x slower on the CPU, where a step of cache hits gathers 64 x 576 positions)
    rows = cache.view(cache.shape[0], -1).index_select(0, group.block_tables.flatten())  # [B * max_blocks, bs*KVH*D]
    return rows.view(num_seqs, max_blocks * cache.shape[1], *cache.shape[2:])[:, : group.num_keys]
