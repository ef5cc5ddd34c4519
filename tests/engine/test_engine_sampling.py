"""Penalties, logit_bias, min_tokens and logprobs through the whole engine, in batches mixed with plain
requests (whose answers must not change)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import Sequence
from node.errors import BadRequest

PROMPT = "The lighthouse keeper"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=128))


def test_every_feature_off_is_the_plain_greedy_answer_even_beside_adjusted_rows(engine: LLMEngine) -> None:
    alone = engine.generate([PROMPT], GREEDY)[0].token_ids
    off = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.0,
                         frequency_penalty=0.0, presence_penalty=0.0, logit_bias={}, min_tokens=0)
    busy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                          presence_penalty=1.0, logit_bias={7: 3.0}, logprobs=5)
    outs = engine.generate([PROMPT, PROMPT, PROMPT], [off, busy, GREEDY])
    assert outs[0].token_ids == outs[2].token_ids == alone
    assert outs[0].logprobs is None and outs[1].logprobs is not None


def test_a_large_logit_bias_forces_its_token_and_penalties_stop_the_repeats(engine: LLMEngine) -> None:
    forced = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, logit_bias={42: 100}))[0]
    assert forced.token_ids == [42] * 6
    plain = engine.generate([PROMPT], GREEDY)[0].token_ids
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself under greedy decoding
    for penalty in ({"repetition_penalty": 10.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                             **penalty))[0].token_ids  # type: ignore[arg-type]
        assert len(set(penalised)) > len(set(plain)), penalty


def test_min_tokens_keeps_a_stop_token_from_ending_the_answer_early(engine: LLMEngine) -> None:
    plain = engine.generate([PROMPT], GREEDY)[0].token_ids
    stop = plain[1]
    early = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,)))[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 2
    held = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,),
                                                    min_tokens=5))[0]
    assert len(held.token_ids) >= 5 and stop not in held.token_ids[:4]


def test_min_tokens_defers_stop_strings_too(engine: LLMEngine) -> None:
    full = engine.generate([PROMPT], GREEDY)[0]
    stop_text = full.text[:2]
    assert engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                    stop=(stop_text,)))[0].text == ""
    held = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                    stop=(stop_text,), min_tokens=4))[0]
    assert len(held.token_ids) >= 4 and held.text.startswith(full.text[:2])


def test_logprobs_are_those_of_the_logits_each_token_was_sampled_from(engine: LLMEngine) -> None:
    seen: list[torch.Tensor] = []

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        seen.extend(logits[i].clone() for i, s in enumerate(seqs) if s.params.logprobs is not None)

    engine.runner.logits_observer = observe
    try:
        out = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))[0]
    finally:
        engine.runner.logits_observer = None
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == len(seen) == 6
    for token, lp, logits in zip(out.token_ids, out.logprobs, seen, strict=True):
        want = logits.log_softmax(-1)
        assert lp.token_id == token == lp.top[0][0]  # greedy: the chosen token is the most likely
        assert lp.logprob == pytest.approx(want[token].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == want.topk(3).indices.tolist()


def test_stream_deltas_carry_the_logprobs_of_their_tokens(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    whole = engine.generate([PROMPT], params)[0]

    async def consume() -> list[tuple[list[int], list[int]]]:
        return [(d.token_ids, [lp.token_id for lp in d.logprobs or []])
                async for d in engine.stream(PROMPT, params)]

    try:
        deltas = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert all(ids == lp_ids for ids, lp_ids in deltas)
    assert [t for ids, _ in deltas for t in ids] == whole.token_ids


def test_token_ids_outside_the_vocabulary_are_refused(engine: LLMEngine) -> None:
    with pytest.raises(BadRequest) as err:
        engine.generate([PROMPT], SamplingParams(logit_bias={engine.model_config.vocab_size: 1.0}))
    assert err.value.facts["param"] == "logit_bias"


def _run(engine: LLMEngine, prompt: list[int], params: list[SamplingParams], key: str | None) -> tuple[
        list[list[int]], int]:
    """The choices' tokens, and the fewest free KV blocks seen while they ran."""
    done: dict[str, list[int]] = {}
    ids = [engine.add_request(prompt, p, request_id=f"{key}-{i}-{id(p)}", prefix_key=key,
                              waiter=lambda o: done.__setitem__(o.request_id, o.token_ids))
           for i, p in enumerate(params)]
    fewest = engine.block_manager.num_free
    while len(done) < len(ids):
        engine.step()
        fewest = min(fewest, engine.block_manager.num_free)
    return [done[i] for i in ids], fewest


@pytest.mark.parametrize("num_kv_blocks", [64, 14])  # 14: too few for all three, so choices are preempted
def test_n_choices_share_their_prompt_blocks_and_answer_as_if_alone(tiny_model: Path, num_kv_blocks: int) -> None:
    engines = [LLMEngine(EngineConfig(model_path=tiny_model, block_size=4, num_kv_blocks=num_kv_blocks,
                                      max_model_len=40, prefix_caching=caching)) for caching in (False, True)]
    prompt = engines[0].tokenizer("The lighthouse keeper climbed the stairs every night to light the lamp").input_ids
    assert len(prompt) > 12
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True, logprobs=1) for s in (1, 2, 3)]
    alone, fewest_alone = _run(engines[0], prompt, params, None)
    shared, fewest_shared = _run(engines[1], prompt, params, "req")
    assert shared == alone and len({tuple(t) for t in shared}) == 3
    if num_kv_blocks == 64:
        assert fewest_shared >= fewest_alone + 2 * ((len(prompt) - 1) // 4)  # two choices took no prompt blocks
    for engine in engines:
        assert engine.block_manager.num_free == num_kv_blocks  # every shared block went back once
