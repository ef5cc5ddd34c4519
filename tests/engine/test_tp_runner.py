"""The engine split across 2 tensor-parallel ranks (gloo, 2 processes, on the CPU): greedy answers
token-identical to one rank and to transformers + peft, for mixed adapters, ranks and the base model
in one batch, adapters loaded once through the tiered store; streams and aborts; a rank that dies
ends its step with a clear error. Other shapes and the engine core started again: test_tp_shapes.py."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import RequestOutput, Sequence
from node.errors import ConfigError, TensorParallelError
from node.lora.adapter import LoRATargetSpec, load_lora_adapter
from node.lora.content_hash import adapter_weights_sha256
from node.lora.provider import AdapterSource
from node.lora.store import AdapterStore, StoreConfig
from node.models.config import ModelConfig
from node.protocol.hexstr import to_hex
from tests.engine.reference import PeftReference, chosen_tokens
from tests.fixtures.models import TinyAdapters

PROMPTS = ["The river runs past", "Seven small boats", "A node serves many adapters over one shared base",
           "Rain", "one two three four five six seven"]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
# pools of rank 4 (1 slot) and 16 (2 slots) for 4 adapters of ranks 2..16: slots are reused mid-run
CONFIG = dict(max_num_seqs=8, max_num_batched_tokens=256, max_lora_rank=16, adapter_rank_pools=((4, 1), (16, 2)),
              block_size=4, max_model_len=256)


def _engine(folder: Path, adapters: dict[str, Path], size: int) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model_path=folder, tensor_parallel_size=size, **CONFIG))  # type: ignore[arg-type]
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def _generate(engine: LLMEngine, prompts: list[str], adapters: list[str | None],
              ) -> tuple[list[RequestOutput], dict[str, torch.Tensor]]:
    rows: dict[str, list[torch.Tensor]] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(seq.request_id, []).append(row.clone())

    engine.runner.logits_observer = observe
    outputs = engine.generate(list(prompts), GREEDY, adapters)
    engine.runner.logits_observer = None
    return outputs, {rid: torch.stack(r) for rid, r in rows.items()}


def _check_same_answers(folder: Path, adapters: dict[str, Path], split: LLMEngine, one: LLMEngine) -> None:
    names: list[str | None] = [None, *adapters]
    chosen = [names[i % len(names)] for i in range(len(PROMPTS) * 2)]
    prompts = PROMPTS * 2
    ours, our_logits = _generate(split, prompts, chosen)
    theirs, their_logits = _generate(one, prompts, chosen)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert (our_logits[a.request_id] - their_logits[b.request_id]).abs().max().item() < 1e-4
    reference = PeftReference(folder, adapters)
    for out, adapter in zip(ours[: len(names) + 1], chosen, strict=False):
        chosen = chosen_tokens(out.token_ids, our_logits[out.request_id])
        assert chosen == reference.greedy(out.prompt_token_ids, GREEDY.max_tokens, adapter), adapter


@pytest.fixture(scope="module")
def one_rank(tiny_model: Path, tiny_adapters: TinyAdapters) -> LLMEngine:
    return _engine(tiny_model, tiny_adapters.paths, 1)


@pytest.fixture(scope="module")
def two_ranks(tiny_model: Path, tiny_adapters: TinyAdapters, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[LLMEngine]:
    """Over the tiered store (disk and host tiers, content hashes checked): rank 0 loads each adapter
    once, and scatters its parts."""
    model = ModelConfig.from_folder(tiny_model)
    parse = functools.partial(load_lora_adapter, target=LoRATargetSpec.of(model.num_layers, model.module_shapes()),
                              max_rank=16)
    config = StoreConfig(cache_dir=tmp_path_factory.mktemp("tp-store"), max_disk_bytes=1 << 30, max_host_bytes=64 << 20)
    with AdapterStore(config, parse, lambda w: w.nbytes) as store:
        engine = LLMEngine(EngineConfig(model_path=tiny_model, tensor_parallel_size=2, **CONFIG),  # type: ignore[arg-type]
                           provider=store)
        for name, path in tiny_adapters.paths.items():
            store.register(name, AdapterSource(str(path), to_hex(adapter_weights_sha256(path))))
        yield engine
        engine.shutdown()


def test_mixed_adapters_and_base_over_two_ranks_answer_as_one_rank_and_peft(
        tiny_model: Path, tiny_adapters: TinyAdapters, two_ranks: LLMEngine, one_rank: LLMEngine) -> None:
    """Llama, GQA with 2 KV heads: adapters of ranks 2, 4, 8 and 16, on all seven projections or on
    q, v and o alone, mixed with the base model in one batch."""
    _check_same_answers(tiny_model, tiny_adapters.paths, two_ranks, one_rank)
    model = ModelConfig.from_folder(tiny_model)
    keys, _ = two_ranks.runner.kv_caches[0]
    assert keys.shape[2] == model.num_kv_heads // 2  # rank 0's KV cache: its KV heads
    assert two_ranks.runner.model.layers[0].qkv_weight.shape[0] == (model.q_size + 2 * model.kv_size) // 2
    assert two_ranks.runner.group.calls["scatter_object"] > 0  # adapters reached rank 1 as scattered parts
    assert two_ranks.provider.metrics().as_dict()["disk"]["misses"] == len(tiny_adapters.paths)  # type: ignore[attr-defined]


def test_a_stream_arrives_delta_by_delta_and_an_abort_ends_it(two_ranks: LLMEngine, one_rank: LLMEngine) -> None:
    expected = one_rank.generate(["The river runs"], GREEDY, ["sea-r8"])[0]

    async def read(params: SamplingParams, stop_after: int | None) -> list[object]:
        out: list[object] = []
        async for delta in two_ranks.stream("The river runs", params, "sea-r8", request_id=f"s-{stop_after}"):
            out.append(delta)
            if stop_after is not None and len(out) == stop_after:
                two_ranks.abort(f"s-{stop_after}")
        return out

    deltas = asyncio.run(read(GREEDY, None))
    assert len(deltas) > 1 and [t for d in deltas for t in d.token_ids] == expected.token_ids  # type: ignore[attr-defined]
    cut = asyncio.run(read(LONG, 2))
    assert cut[-1].finish_reason == "abort" and len(cut) < LONG.max_tokens  # type: ignore[attr-defined]
    assert two_ranks.generate(["Rain"], GREEDY)[0].token_ids == one_rank.generate(["Rain"], GREEDY)[0].token_ids


def test_a_model_that_does_not_split_or_a_second_group_is_refused_before_any_process_starts(
        tiny_model: Path, two_ranks: LLMEngine) -> None:
    with pytest.raises(ConfigError, match="4 attention heads do not split 3 ways"):
        LLMEngine(EngineConfig(model_path=tiny_model, tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="one tensor-parallel engine per process"):
        LLMEngine(EngineConfig(model_path=tiny_model, tensor_parallel_size=2))
    assert len(multiprocessing.active_children()) == 1  # two_ranks' worker alone


def test_a_rank_that_dies_mid_request_ends_the_step_with_a_clear_error(two_ranks: LLMEngine) -> None:
    """Rank 1 is killed while a long answer streams: the request ends with TensorParallelError naming the
    rank; later steps are refused the same way (the group is broken: its core is started again)."""
    worker = two_ranks.runner.group.procs[0]

    async def read() -> list[object]:
        out: list[object] = []
        async for delta in two_ranks.stream("The river runs", LONG, None, request_id="doomed"):
            out.append(delta)
            if len(out) == 2:
                os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        return out

    deltas = asyncio.run(asyncio.wait_for(read(), timeout=120))
    assert deltas[-1].finish_reason == "error"  # type: ignore[attr-defined]
    after = two_ranks.generate(["Rain"], GREEDY)[0]
    assert after.finish_reason == "error" and isinstance(after.error, TensorParallelError)
    assert "rank 1 exited with code -9" in after.error.message
