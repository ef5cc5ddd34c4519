"""Our forward + LoRA against transformers + peft: logits within 1e-4 at prefill and every decode
step, and token-identical greedy output, for each adapter alone and all mixed with the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from tests.engine.reference import PeftReference, chosen_tokens
from tests.fixtures.models import TinyAdapters

PROMPTS = ["The river runs past", "Seven small boats", "A node serves many adapters over one shared base",
           "Rain", "one two three four five six seven", "The lighthouse keeper climbed"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tiny_adapters: TinyAdapters) -> PeftReference:
    return PeftReference(tiny_model, tiny_adapters.paths)


def _engine(tiny_model: Path, tiny_adapters: TinyAdapters, **overrides: int) -> LLMEngine:
    config = dict(max_num_seqs=16, max_num_batched_tokens=256, max_lora_rank=16, max_adapter_slots=4)
    config.update(overrides)
    engine = LLMEngine(EngineConfig(model_path=tiny_model, **config))  # type: ignore[arg-type]
    for name, path in tiny_adapters.paths.items():
        engine.add_adapter(name, path)
    return engine


def _run_and_record(engine: LLMEngine, prompts: list[str], adapters: list[str | None]):
    steps: dict[str, list[torch.Tensor]] = {}

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits, strict=True):
            steps.setdefault(seq.request_id, []).append(row.clone())

    engine.runner.logits_observer = observe
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outputs = engine.generate(list(prompts), params, adapters)
    return outputs, steps


def _check(reference: PeftReference, outputs, steps, adapters: list[str | None]) -> None:
    for out, adapter in zip(outputs, adapters, strict=True):
        ours = torch.stack(steps[out.request_id])  # [MAX_TOKENS, V]
        chosen = chosen_tokens(out.token_ids, ours)
        full = out.prompt_token_ids + chosen
        expected = reference.logits(full[:-1], adapter)[len(out.prompt_token_ids) - 1:]  # [MAX_TOKENS, V]
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() < 1e-4, (adapter, out.request_id)
        assert chosen == reference.greedy(out.prompt_token_ids, MAX_TOKENS, adapter), adapter


@pytest.mark.parametrize("adapter", [None, "sea-r8", "count-r4", "food-r16", "stars-attn-r2"])
def test_each_adapter_alone_matches_peft(tiny_model: Path, tiny_adapters: TinyAdapters,
                                         reference: PeftReference, adapter: str | None) -> None:
    engine = _engine(tiny_model, tiny_adapters)
    adapters = [adapter] * 3
    outputs, steps = _run_and_record(engine, PROMPTS[:3], adapters)
    _check(reference, outputs, steps, adapters)


def test_all_adapters_mixed_with_base_in_one_batch_match_peft(
    tiny_model: Path, tiny_adapters: TinyAdapters, reference: PeftReference
) -> None:
    names: list[str | None] = [None, *tiny_adapters.paths]
    adapters = [names[i % len(names)] for i in range(len(PROMPTS) * 2)]
    prompts = PROMPTS * 2
    engine = _engine(tiny_model, tiny_adapters)
    outputs, steps = _run_and_record(engine, prompts, adapters)
    _check(reference, outputs, steps, adapters)
    # the adapters really steer generation: not every output equals the base model's
    base = {o.prompt_token_ids[0]: o.token_ids for o, a in zip(outputs, adapters, strict=True) if a is None}
    assert any(o.token_ids != base.get(o.prompt_token_ids[0], o.token_ids)
               for o, a in zip(outputs, adapters, strict=True) if a is not None)


def test_chunked_prefill_tiny_blocks_and_fewer_slots_still_match(
    tiny_model: Path, tiny_adapters: TinyAdapters, reference: PeftReference
) -> None:
    """Prefills cut into 4-token chunks, 2-token blocks, 2 slots for 4 adapters: same logits."""
    names: list[str | None] = [None, *tiny_adapters.paths]
    adapters = [names[i % len(names)] for i in range(len(PROMPTS))]
    engine = _engine(tiny_model, tiny_adapters, max_num_batched_tokens=4, block_size=2, max_adapter_slots=2)
    outputs, steps = _run_and_record(engine, PROMPTS, adapters)
    _check(reference, outputs, steps, adapters)
