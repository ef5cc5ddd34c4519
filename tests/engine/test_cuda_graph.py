"""Decode graphs: bucket choice, padding rows, the attention fallback, and the padded static-buffer
forward (what a CUDA graph replays) giving the same hidden states as the eager step, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.cuda_graph import DecodeBatch, DecodeGraphs, bucket_for, buckets_up_to, pad_decode
from node.models.attention import AttentionBatch, build_group, decode_backend
from tests.fixtures.models import TinyAdapters


def test_buckets_end_at_the_batch_limit_and_batches_take_the_smallest_that_fits() -> None:
    buckets = buckets_up_to(100)
    assert buckets[0] == 1 and buckets[-1] == 100 and list(buckets) == sorted(set(buckets))
    assert bucket_for(1, buckets) == 1 and bucket_for(3, buckets) == 4 and bucket_for(64, buckets) == 64
    assert bucket_for(97, buckets) == 100
    assert bucket_for(101, buckets) is None  # larger than every graph: the step runs eagerly


def test_padding_rows_write_the_scratch_kv_index_attend_one_position_and_use_no_adapter() -> None:
    batch = DecodeBatch(token_ids=[5, 6], positions=[9, 3], kv_indices=[41, 50], block_tables=[[2, 3], [4]],
                        context_lens=[10, 4], token_slots=[1, -1])
    padded = pad_decode(batch, bucket=4, max_blocks=3, scratch_kv_index=999)
    assert padded.token_ids == [5, 6, 0, 0] and padded.positions == [9, 3, 0, 0]
    assert padded.kv_indices == [41, 50, 999, 999]
    assert padded.block_tables == [[2, 3, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert padded.context_lens == [10, 4, 1, 1] and padded.token_slots == [1, -1, -1, -1]


def test_decode_attention_gathers_on_the_cpu_and_reads_in_place_on_cuda() -> None:
    assert decode_backend(torch.device("cpu"), 256) == "sdpa"  # no CUDA
    # flash-attn pages are multiples of 256: other block sizes take our Triton kernel
    assert decode_backend(torch.device("cuda"), 16) == "triton"


def test_the_padded_graph_forward_matches_the_eager_decode_step(tiny_model: Path, tiny_adapters: TinyAdapters,
                                                                 ) -> None:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=64, block_size=4))
    runner = engine.runner
    assert runner.graphs is None  # CPU: no graphs, the eager path
    slot = runner.slots.activate("sea", engine.parse_adapter(tiny_adapters.paths["sea-r8"]), in_use=())
    for k_cache, v_cache in runner.kv_caches:  # some cached context to attend
        k_cache.normal_()
        v_cache.normal_()
    tables, context = [[0, 1, 2], [3, 4], [5]], [11, 6, 2]
    batch = DecodeBatch(token_ids=[7, 8, 9], positions=[c - 1 for c in context],
                        kv_indices=[t[(c - 1) // 4] * 4 + (c - 1) % 4 for t, c in zip(tables, context, strict=True)],
                        block_tables=tables, context_lens=context, token_slots=[slot, -1, slot])
    group = build_group([1, 1, 1], context, tables, 0, torch.device("cpu"))
    with torch.inference_mode():
        eager = runner.model(torch.tensor(batch.token_ids), torch.tensor(batch.positions),
                             AttentionBatch(torch.tensor(batch.kv_indices), (group,)), runner.kv_caches,
                             runner.slots.batch(batch.token_slots))
        graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.slots, max_batch=8, max_blocks=16,
                              block_size=4, scratch_kv_index=runner.num_blocks * 4, use_graphs=False)
        padded = graphs.run(batch)  # bucket 4: one padding row
    assert padded.shape == eager.shape
    assert torch.allclose(padded, eager, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter
def test_the_graph_forward_with_rank_pools_runs_the_fused_kernels_of_the_pools_in_use(
        tiny_model: Path, tiny_adapters: TinyAdapters, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph captures with LoRA, on the CPU: the static forward over the buffer of global
    slot ids, one fused Triton launch per group and pool in use (in the interpreter: `uses_triton` is
    forced), against the eager step's torch ops."""
    from node.lora import ops, triton_fused

    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=64, block_size=4,
                                    max_lora_rank=16, adapter_rank_pools=((4, 1), (8, 1), (16, 1))))
    runner = engine.runner
    slots = [runner.slots.activate(name, engine.parse_adapter(tiny_adapters.paths[name]), in_use=())
             for name in ("sea-r8", "count-r4")]
    for k_cache, v_cache in runner.kv_caches:
        k_cache.normal_()
        v_cache.normal_()
    batch = DecodeBatch(token_ids=[7, 8, 9], positions=[5, 2, 0], kv_indices=[5, 6, 8],
                        block_tables=[[1], [1, 2], [2]], context_lens=[6, 3, 1], token_slots=[slots[0], -1, slots[1]])
    pools = runner.slots.pools_in_use(batch.token_slots)
    assert pools == (0, 1)  # ranks 4 and 8; the rank-16 pool gets no launch
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.slots, max_batch=8, max_blocks=4,
                          block_size=4, scratch_kv_index=runner.num_blocks * 4, use_graphs=False)
    with torch.inference_mode():
        eager = graphs.run(batch)  # the torch ops over per-step plans
        launches: list[int] = []  # the slot_base of each launch
        kernel = triton_fused.lora_gather_fused
        monkeypatch.setattr(ops, "uses_triton", lambda device: True)
        monkeypatch.setattr(triton_fused, "lora_gather_fused", lambda *a: launches.append(a[7]) or kernel(*a))
        bucket, _ = graphs.fill(batch)
        static = graphs.static_forward(bucket, pools)[:3]
    num_layers = len(runner.kv_caches)
    assert sorted(set(launches)) == [0, 1] and len(launches) == 4 * 2 * num_layers  # slot_base of pools 0, 1
    assert torch.allclose(static, eager, atol=1e-4), (static - eager).abs().max()


@pytest.mark.gpu
def test_cuda_graphs_with_rank_pools_answer_as_the_cpu_engine(tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    """CUDA: decode steps replayed from graphs captured per (bucket, rank pools in use), the fused LoRA
    kernels inside; greedy answers of batches mixing the base model and adapters of three rank pools
    are the CPU engine's, token for token."""
    names = ["sea-r8", "count-r4", "food-r16", None, "count-r4", None]
    answers = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model_path=tiny_model, device=device, max_model_len=64, max_lora_rank=16,
                                        adapter_rank_pools=((4, 1), (8, 1), (16, 1))))
        for name in ("sea-r8", "count-r4", "food-r16"):
            engine.add_adapter(name, tiny_adapters.paths[name])
        params = SamplingParams(max_tokens=8, temperature=0)
        mixed = engine.generate([[5, 6, 7, 8]] * 6, params, names)  # type: ignore[arg-type]
        small = engine.generate([[9, 4, 2]] * 2, params, ["count-r4", None])  # the rank-4 pool alone
        answers[device] = [o.token_ids for o in mixed + small]
        if device == "cuda":
            graphs = engine.runner.graphs
            assert graphs is not None
            assert {pools for _, pools in graphs.graphs} >= {(0, 1, 2), (0,)}, list(graphs.graphs)
    assert answers["cpu"] == answers["cuda"]
