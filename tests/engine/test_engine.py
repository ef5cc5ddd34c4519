"""The public LLMEngine API as a user (or the API service) calls it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams, StreamDelta
from node.engine.sequence import Sequence
from node.errors import AdapterFormatError, AdapterNotFound, AdapterSourceError, PromptTooLong
from node.lora.adapter import LoRAWeights
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterSource, LoadState
from tests.fixtures.models import TinyAdapters

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model: Path, tiny_adapters: TinyAdapters) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=128,
                                    max_adapter_slots=2, max_lora_rank=16))
    for name, path in tiny_adapters.paths.items():
        engine.add_adapter(name, path)
    return engine


def test_generate_takes_strings_and_token_ids_and_keeps_order(engine: LLMEngine) -> None:
    ids = engine.tokenizer("Seven small boats").input_ids
    outs = engine.generate(["The river runs", ids], GREEDY, ["sea-r8", None])
    assert outs[1].prompt_token_ids == ids and outs[1].num_prompt_tokens == len(ids)
    for out in outs:
        assert out.finish_reason == "length" and out.num_completion_tokens == 10 == len(out.token_ids)
        assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert engine.count_tokens("Seven small boats") == len(ids)


def test_sampling_is_reproducible_per_seed_and_params_are_per_request(engine: LLMEngine) -> None:
    hot = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=11, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.0, seed=12, ignore_eos=True)
    greedy_alone = engine.generate(["The cat sat"], GREEDY)[0].token_ids
    a, b, c, g = engine.generate(["The cat sat"] * 4, [hot, hot, other, GREEDY])
    assert a.token_ids == b.token_ids != c.token_ids
    assert g.token_ids == greedy_alone


def test_stop_strings_and_stop_token_ids(engine: LLMEngine) -> None:
    full = engine.generate(["The lighthouse keeper"], GREEDY)[0]
    stop_token = full.token_ids[4]
    first = full.token_ids.index(stop_token)
    by_token = engine.generate(["The lighthouse keeper"], SamplingParams(
        max_tokens=10, temperature=0, stop_token_ids=(stop_token,)))[0]
    assert by_token.finish_reason == "stop" and by_token.token_ids == full.token_ids[: first + 1]
    stop_text = full.text[len(full.text) // 2:][:3]
    cut = full.text.index(stop_text)
    by_text = engine.generate(["The lighthouse keeper"], SamplingParams(
        max_tokens=10, temperature=0, stop=(stop_text,)))[0]
    assert by_text.finish_reason == "stop" and by_text.text == full.text[:cut]


def test_preemption_under_a_tiny_kv_cache_changes_no_output(tiny_model: Path, engine: LLMEngine) -> None:
    prompts = ["The river runs past", "Seven small boats left", "Rain fell softly", "Bees move from"]
    expected = [o.token_ids for o in engine.generate(prompts, GREEDY, ["sea-r8", None, "count-r4", None])]
    small = LLMEngine(EngineConfig(model_path=tiny_model, block_size=4, num_kv_blocks=10, max_model_len=40,
                                   max_adapter_slots=2))
    small.add_adapter("sea-r8", _path(engine, "sea-r8"))
    small.add_adapter("count-r4", _path(engine, "count-r4"))
    preempted: set[str] = set()

    def observe(seqs: list[Sequence], _logits: object) -> None:
        preempted.update(s.request_id for s in seqs if s.num_preemptions)

    small.runner.logits_observer = observe
    outs = small.generate(prompts, GREEDY, ["sea-r8", None, "count-r4", None])
    assert [o.token_ids for o in outs] == expected
    assert preempted, "the cache was meant to be too small for all four at once"


def _path(engine: LLMEngine, adapter_id: str) -> Path:
    return Path(engine.provider._sources[adapter_id].uri)  # type: ignore[attr-defined]


def test_a_broken_adapter_fails_only_its_request(engine: LLMEngine, tiny_adapters: TinyAdapters,
                                                 tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_adapters.paths["food-r16"], tmp_path / "broken")
    config = '{"peft_type": "LORA", "r": 16, "lora_alpha": 16, "use_dora": true}'
    (broken / "adapter_config.json").write_text(config)
    engine.provider.register("broken", AdapterSource(uri=str(broken), sha256=""))
    bad, good = engine.generate(["The river", "The river"], GREEDY, ["broken", "sea-r8"])
    assert bad.finish_reason == "error" and isinstance(bad.error, AdapterFormatError) and bad.token_ids == []
    assert good.finish_reason == "length" and len(good.token_ids) == 10
    with pytest.raises(AdapterFormatError, match="DoRA"):
        engine.add_adapter("broken2", broken)


def test_unknown_removed_adapters_and_long_prompts_are_refused(engine: LLMEngine) -> None:
    with pytest.raises(AdapterNotFound):
        engine.generate(["hi", "there"], GREEDY, [None, "nope"])
    assert not engine.has_unfinished()  # all or nothing: the first prompt was dropped too
    engine.remove_adapter("sea-r8")
    with pytest.raises(AdapterNotFound):
        engine.generate(["hi"], GREEDY, ["sea-r8"])
    with pytest.raises(PromptTooLong):
        engine.generate([[5] * 128], GREEDY)


def test_stream_yields_deltas_that_add_up_to_the_generated_output(engine: LLMEngine) -> None:
    expected = engine.generate(["Trains cross the valley"], GREEDY, ["count-r4"])[0]

    async def consume() -> list[StreamDelta]:
        return [d async for d in engine.stream("Trains cross the valley", GREEDY, "count-r4")]

    try:
        deltas = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_completion_tokens == 10
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text


def test_leaving_a_stream_early_aborts_the_request(engine: LLMEngine) -> None:
    async def take_two() -> int:
        seen = 0
        async for _ in engine.stream("Stars appeared", SamplingParams(max_tokens=200, ignore_eos=True),
                                     request_id="early"):
            seen += 1
            if seen == 2:
                break
        return seen

    try:
        assert asyncio.run(take_two()) == 2
        for _ in range(200):
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert not engine.has_unfinished()
    finally:
        engine.shutdown()


def test_generate_while_the_background_loop_runs(engine: LLMEngine) -> None:
    expected = engine.generate(["Green hills"], GREEDY, ["food-r16"])[0].token_ids
    engine.start()
    try:
        assert engine.generate(["Green hills"], GREEDY, ["food-r16"])[0].token_ids == expected
    finally:
        engine.shutdown()


class VanishingStore(InMemoryAdapterProvider[LoRAWeights]):
    """A store that says READY, then cannot produce the weights (its host copy and file are gone)."""

    vanished: frozenset[str] = frozenset()

    def get(self, adapter_id: str) -> LoRAWeights:
        if adapter_id in self.vanished:
            raise AdapterSourceError("the adapter file is gone", adapter=adapter_id)
        return super().get(adapter_id)

    def state(self, adapter_id: str) -> LoadState:
        return LoadState.READY if adapter_id in self._sources else LoadState.UNKNOWN


def test_an_adapter_lost_after_admission_fails_only_its_request(tiny_model: Path,
                                                               tiny_adapters: TinyAdapters) -> None:
    config = EngineConfig(model_path=tiny_model, max_model_len=64, max_adapter_slots=2)
    store = VanishingStore(parse=lambda folder: engine.parse_adapter(folder))
    engine = LLMEngine(config, provider=store)
    for name in ("sea-r8", "count-r4"):
        engine.add_adapter(name, tiny_adapters.paths[name])
    store.vanished = frozenset({"count-r4"})
    lost, kept, base = engine.generate(["Rain"] * 3, GREEDY, ["count-r4", "sea-r8", None])
    assert lost.finish_reason == "error" and isinstance(lost.error, AdapterSourceError)
    assert kept.finish_reason == base.finish_reason == "length"


def test_a_resident_adapter_is_not_fetched_from_the_host_tier_every_step(engine: LLMEngine) -> None:
    calls: list[str] = []
    get = engine.provider.get

    def counting_get(adapter_id: str) -> LoRAWeights:
        calls.append(adapter_id)
        return get(adapter_id)

    engine.provider.get = counting_get  # type: ignore[method-assign]
    engine.generate(["The river runs"], GREEDY, ["sea-r8"])  # 10 decode steps
    assert calls.count("sea-r8") <= 1  # copied to a device slot once (or already there), then used from it


def test_adapter_slots_fit_a_device_byte_budget(tiny_model: Path) -> None:
    from node.errors import ConfigError
    from node.lora.adapter import LoRATargetSpec
    from node.lora.slots import LoRASlots
    from node.models.config import ModelConfig

    cfg = ModelConfig.from_folder(tiny_model)
    target = LoRATargetSpec.of(cfg.num_layers, cfg.module_shapes())
    per_slot = LoRASlots.slot_nbytes(target, 16, torch.float32)
    base = dict(model_path=tiny_model, max_model_len=64, max_lora_rank=16, max_adapter_slots=8)
    engine = LLMEngine(EngineConfig(**base, max_adapter_memory_bytes=3 * per_slot + per_slot // 2))
    slots = engine.runner.slots
    assert slots.num_slots == 3 and len(slots.pools) == 1
    pool = slots.pools[0]
    assert sum(t.numel() * t.element_size() for layer in (*pool.a, *pool.b) for t in layer.values()) == 3 * per_slot
    assert LLMEngine(EngineConfig(**base, max_adapter_memory_bytes=100 * per_slot)).runner.slots.num_slots == 8
    with pytest.raises(ConfigError, match="holds no adapter slot"):
        LLMEngine(EngineConfig(**base, max_adapter_memory_bytes=per_slot - 1))
