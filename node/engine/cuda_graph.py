"""Decode steps replayed from CUDA graphs, one per batch-size bucket (and with or without LoRA).

A decode step launches hundreds of small kernels; at batch sizes where decoding is bound by memory
bandwidth, their launch overhead is a large share of the step. A graph captured once per bucket
replays them in one launch. Shapes are fixed per bucket: the batch is padded up to the bucket with
rows that write their key/value at a scratch KV index, attend one position and use no adapter,
and whose outputs are dropped. Attention reads the KV cache through a fixed [bucket, max_blocks]
block table (`dense_decode_group`), LoRA through the fused gather kernels (one launch per group and
rank pool), whose shapes depend on the bucket alone. A graph is captured per (bucket, rank pools the
step's adapters live in), so a step launches LoRA kernels only for the pools it uses; graphs are
captured lazily, the first time such a key is met.

Without CUDA graphs (`use_graphs=False`: the CPU, tests) the same padded static-buffer forward runs
eagerly, with the torch LoRA ops.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from node.lora.slots import LoRABatch, LoRASlotPools
from node.models.attention import AttentionBatch, dense_decode_group
from node.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The capture sizes for batches of at most `max_batch` sequences (the largest is max_batch itself)."""
    return (*(b for b in BUCKETS if b < max_batch), max_batch)


def bucket_for(num_seqs: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `num_seqs`; None when the batch is larger than every bucket."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step as host values: one new token per sequence."""

    token_ids: list[int]
    positions: list[int]
    kv_indices: list[int]  # KV cache index of each new token
    block_tables: list[list[int]]
    context_lens: list[int]  # cached positions once this step's key is written
    token_slots: list[int]  # adapter slot per sequence, -1 for the base model


@dataclass(frozen=True)
class PaddedDecode:
    """A DecodeBatch padded to a bucket, as the rows of the static buffers."""

    token_ids: list[int]
    positions: list[int]
    kv_indices: list[int]
    block_tables: list[list[int]]  # each padded to max_blocks
    context_lens: list[int]
    token_slots: list[int]


def pad_decode(batch: DecodeBatch, bucket: int, max_blocks: int, scratch_kv_index: int) -> PaddedDecode:
    """Pad to `bucket` rows: pads write the scratch slot, attend one position and use no adapter."""
    n = len(batch.token_ids)
    assert n <= bucket and all(len(t) <= max_blocks for t in batch.block_tables), (n, bucket)
    pad = bucket - n
    tables = [t + [0] * (max_blocks - len(t)) for t in batch.block_tables] + [[0] * max_blocks] * pad
    return PaddedDecode(token_ids=batch.token_ids + [0] * pad, positions=batch.positions + [0] * pad,
                        kv_indices=batch.kv_indices + [scratch_kv_index] * pad, block_tables=tables,
                        context_lens=batch.context_lens + [1] * pad, token_slots=batch.token_slots + [-1] * pad)


class DecodeGraphs:
    """Captures and replays the model's decode forward per (bucket, uses LoRA)."""

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 slots: LoRASlotPools, max_batch: int, max_blocks: int, block_size: int, scratch_kv_index: int,
                 use_graphs: bool = True):
        self.model, self.kv_caches, self.slots, self.use_graphs = model, kv_caches, slots, use_graphs
        self.buckets = buckets_up_to(max_batch)
        self.max_blocks, self.block_size, self.scratch_kv_index = max_blocks, block_size, scratch_kv_index
        device = kv_caches[0][0].device
        size = self.buckets[-1]
        self.token_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.kv_indices = torch.zeros(size, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.long, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.token_slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, tuple[int, ...]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, num_seqs: int) -> int | None:
        return bucket_for(num_seqs, self.buckets)

    @torch.inference_mode()
    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Final hidden states [num_seqs, hidden] of the decode step (the caller checked the bucket)."""
        n = len(batch.token_ids)
        bucket, padded = self.fill(batch)
        if not self.use_graphs:
            return self._forward(bucket, self.slots.batch(padded.token_slots, "gather"))[:n]
        key = (bucket, self.slots.pools_in_use(batch.token_slots))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:n]

    def fill(self, batch: DecodeBatch) -> tuple[int, PaddedDecode]:
        """Copy the step, padded to its bucket, into the static buffers; returns (bucket, padded)."""
        bucket = self.bucket(len(batch.token_ids))
        assert bucket is not None, len(batch.token_ids)
        padded = pad_decode(batch, bucket, self.max_blocks, self.scratch_kv_index)
        host = (torch.tensor(padded.token_ids), torch.tensor(padded.positions), torch.tensor(padded.kv_indices),
                torch.tensor(padded.block_tables), torch.tensor(padded.context_lens, dtype=torch.int32),
                torch.tensor(padded.token_slots, dtype=torch.int32))
        buffers = (self.token_ids, self.positions, self.kv_indices, self.block_tables, self.context_lens,
                   self.token_slots)
        for buf, values in zip(buffers, host, strict=True):
            buf[:bucket].copy_(values, non_blocking=True)
        return bucket, padded

    def _forward(self, bucket: int, lora: LoRABatch | None) -> torch.Tensor:
        group = dense_decode_group(self.block_tables[:bucket], self.context_lens[:bucket], self.block_size)
        batch = AttentionBatch(kv_indices=self.kv_indices[:bucket], groups=(group,))
        hidden: torch.Tensor = self.model(self.token_ids[:bucket], self.positions[:bucket], batch, self.kv_caches, lora)
        return hidden

    def static_forward(self, bucket: int, pools: tuple[int, ...]) -> torch.Tensor:
        """The forward over the static buffers; with LoRA, the gather plans of `pools` over the static
        slot buffer of global ids (the Triton kernels read only `token_slots`, each launch skipping the
        ids outside its pool)."""
        lora = self.slots.static_batch(self.token_slots[:bucket], pools) if pools else None
        return self._forward(bucket, lora)

    def _capture(self, bucket: int, pools: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.static_forward(bucket, pools)  # warm-up: Triton compiles and cuBLAS picks its kernels
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self.static_forward(bucket, pools)
        log.info("captured the decode graph of %d sequences (LoRA pools: %s)", bucket, pools)
        return graph, hidden
