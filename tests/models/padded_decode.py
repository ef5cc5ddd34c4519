"""A tiny engine's padded decode step over random cached context: the static-buffer forward a CUDA
graph replays (`DecodeGraphs`), run eagerly on the CPU. Three sequences of 11, 6 and 2 cached tokens
over blocks of 4 fill bucket 4 with one padding row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.engine import EngineConfig, LLMEngine
from node.engine.cuda_graph import DecodeBatch, DecodeGraphs
from node.engine.model_runner import ModelRunner

BLOCK_SIZE = 4
TABLES, CONTEXT = [[0, 1, 2], [3, 4], [5]], [11, 6, 2]


@dataclass(frozen=True)
class PaddedDecode:
    runner: ModelRunner
    batch: DecodeBatch
    graphs: DecodeGraphs


def padded_decode(model: Path) -> PaddedDecode:
    """The engine of `model` (4 sequences, 64 tokens, block 4) with random keys and values in every
    cache block, the three-sequence decode batch, and eager `DecodeGraphs` over its buffers."""
    runner = LLMEngine(EngineConfig(model_path=model, max_num_seqs=4, max_model_len=64,
                                    block_size=BLOCK_SIZE)).runner
    for k_cache, v_cache in runner.kv_caches:  # cached context to attend
        k_cache.normal_()
        v_cache.normal_()
    kv_indices = [t[(c - 1) // BLOCK_SIZE] * BLOCK_SIZE + (c - 1) % BLOCK_SIZE
                  for t, c in zip(TABLES, CONTEXT, strict=True)]
    batch = DecodeBatch(token_ids=[7, 8, 9], positions=[c - 1 for c in CONTEXT], kv_indices=kv_indices,
                        block_tables=TABLES, context_lens=CONTEXT, token_slots=[-1, -1, -1])
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.slots, max_batch=4, max_blocks=16,
                          block_size=BLOCK_SIZE, scratch_kv_index=runner.num_blocks * BLOCK_SIZE, use_graphs=False)
    return PaddedDecode(runner, batch, graphs)
