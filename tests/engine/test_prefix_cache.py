"""The prefix cache as a user sees it: the same answers with it on and off, whatever the traffic
(mixed adapters, chunked prefill, preemption, abort, n choices, streaming), the prefill of a repeated
prompt skipped, and never one adapter's keys and values read under another."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.model_inputs import prefill_length_groups
from node.engine.sampling import MAX_CACHE_SALT_LENGTH
from node.engine.scheduler import ScheduledSeq
from node.engine.sequence import Sequence
from node.errors import BadRequest
from tests.engine.reference import PeftReference, chosen_tokens
from tests.fixtures.models import TinyAdapters

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SYSTEM = "You answer for a harbour town, in one short sentence."
USERS = ["When does the ferry go?", "Who keeps the light?", "Is the market open?", "Where do gulls nest?"]
ADAPTERS: list[str | None] = ["sea-r8", "count-r4", None, "sea-r8"]


def _engine(tiny_model: Path, tiny_adapters: TinyAdapters, caching: bool, **overrides: int) -> LLMEngine:
    config = dict(block_size=4, max_num_seqs=8, max_model_len=64, max_lora_rank=16, max_adapter_slots=4)
    config.update(overrides)
    engine = LLMEngine(EngineConfig(model_path=tiny_model, prefix_caching=caching, **config))  # type: ignore[arg-type]
    for name, path in tiny_adapters.paths.items():
        engine.add_adapter(name, path)
    return engine


def _prompts(engine: LLMEngine) -> list[list[int]]:
    system = engine.tokenizer(SYSTEM).input_ids
    assert len(system) > 12
    return [system + engine.tokenizer(" " + user).input_ids for user in USERS]


def _twice(engine: LLMEngine) -> list[list[int]]:
    """Every prompt twice in one batch (the second of each finds the first's blocks cached)."""
    return [o.token_ids for o in engine.generate(_prompts(engine) * 2, GREEDY, ADAPTERS * 2)]


@pytest.mark.parametrize("overrides", [
    {},  # all six in one batch
    {"max_num_batched_tokens": 12},  # prefills in chunks of at most 12 tokens, their context from the cache
    {"num_kv_blocks": 16},  # too few blocks for all: preempted ones recompute, and hit their own blocks
], ids=["batch", "chunked", "preempted"])
def test_answers_are_token_identical_with_the_cache_on_and_off(
        tiny_model: Path, tiny_adapters: TinyAdapters, overrides: dict[str, int]) -> None:
    on = _engine(tiny_model, tiny_adapters, True, **overrides)
    off = _engine(tiny_model, tiny_adapters, False, **overrides)
    preempted: set[str] = set()
    on.runner.logits_observer = lambda seqs, _: preempted.update(s.request_id for s in seqs if s.num_preemptions)
    assert _twice(on) == _twice(off)
    stats = on.kv_cache_stats()
    assert stats.num_hit_tokens > 0 and off.kv_cache_stats().num_hit_tokens == 0
    assert stats.num_free_blocks == stats.num_blocks  # every block came back
    if "num_kv_blocks" in overrides:
        assert preempted and stats.num_evictions > 0


def test_a_repeated_prompt_skips_its_cached_blocks_under_its_own_adapter_only(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    engine = _engine(tiny_model, tiny_adapters, True)
    prompt = _prompts(engine)[0]
    full_blocks = (len(prompt) - 1) // 4  # the block of the last token is always computed
    tables: dict[str, list[int]] = {}
    hits: dict[str, int] = {}

    def observe(seqs: list[Sequence], _logits: torch.Tensor) -> None:
        for seq in seqs:
            tables.setdefault(seq.request_id, list(seq.block_table))

    engine.runner.logits_observer = observe
    for rid, adapter in [("sea", "sea-r8"), ("sea-again", "sea-r8"), ("count", "count-r4"), ("base", None)]:
        before = engine.kv_cache_stats().num_hit_tokens
        engine.add_request(prompt, GREEDY, adapter, request_id=rid)
        while engine.has_unfinished():
            engine.step()
        hits[rid] = engine.kv_cache_stats().num_hit_tokens - before
    assert hits == {"sea": 0, "sea-again": full_blocks * 4, "count": 0, "base": 0}
    assert tables["sea-again"][:full_blocks] == tables["sea"][:full_blocks]
    for other in ("count", "base"):
        assert not set(tables[other][:full_blocks]) & set(tables["sea"][:full_blocks])
    stats = engine.kv_cache_stats()
    assert stats.hit_rate == pytest.approx(full_blocks * 4 / (4 * len(prompt)))
    assert stats.num_cached_blocks >= 3 * full_blocks


def test_cached_context_gives_the_logits_of_a_full_forward(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    reference = PeftReference(tiny_model, {"sea-r8": tiny_adapters.paths["sea-r8"]})
    engine = _engine(tiny_model, tiny_adapters, True, max_num_batched_tokens=12)
    prompts = _prompts(engine)[:3]
    engine.generate(prompts[:1], GREEDY, ["sea-r8"])  # caches the system prompt under sea-r8
    rows: dict[str, list[torch.Tensor]] = {}
    engine.runner.logits_observer = lambda seqs, logits: [
        rows.setdefault(s.request_id, []).append(r.clone()) for s, r in zip(seqs, logits, strict=True)]
    outs = engine.generate(prompts, GREEDY, ["sea-r8", "sea-r8", None])
    for out, adapter in zip(outs, ["sea-r8", "sea-r8", None], strict=True):
        ours = torch.stack(rows[out.request_id])  # [6, vocab]
        full = out.prompt_token_ids + chosen_tokens(out.token_ids, ours)
        expected = reference.logits(full[:-1], adapter)[len(out.prompt_token_ids) - 1:]  # [6, vocab]
        assert (ours - expected).abs().max().item() < 1e-4


def test_an_abort_mid_prefill_leaves_only_blocks_that_give_the_same_answers(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    on = _engine(tiny_model, tiny_adapters, True, max_num_batched_tokens=8)
    off = _engine(tiny_model, tiny_adapters, False, max_num_batched_tokens=8)
    prompts = _prompts(on)
    for engine in (on, off):
        engine.add_request(prompts[0], GREEDY, "sea-r8", request_id="cut")
        engine.add_request(prompts[1], GREEDY, None, request_id="cut-decoding")
        for _ in range(5):  # "cut" is part way through its prompt, "cut-decoding" has a few tokens
            engine.step()
        engine.abort("cut")
        engine.abort("cut-decoding")
    assert on.kv_cache_stats().num_cached_blocks > 0
    outs = [[o.token_ids for o in e.generate(prompts, GREEDY, list(ADAPTERS))] for e in (on, off)]
    assert outs[0] == outs[1]
    assert on.kv_cache_stats().num_hit_tokens > 0


def test_n_sampled_choices_and_streams_answer_as_without_the_cache(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    engines = [_engine(tiny_model, tiny_adapters, caching) for caching in (True, False)]
    prompt = _prompts(engines[0])[2]
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in (5, 6, 7)]

    async def stream(engine: LLMEngine) -> list[list[int]]:
        async def one(p: SamplingParams, i: int) -> list[int]:
            return [t async for d in engine.stream(prompt, p, "food-r16", prefix_key="n") for t in d.token_ids]
        return list(await asyncio.gather(*(one(p, i) for i, p in enumerate(params))))

    answers = []
    for engine in engines:
        try:
            answers.append((asyncio.run(stream(engine)), asyncio.run(stream(engine))))
        finally:
            engine.shutdown()
    assert answers[0] == answers[1] and len({tuple(t) for t in answers[0][0]}) == 3
    assert engines[0].kv_cache_stats().num_hit_tokens >= 5 * ((len(prompt) - 1) // 4) * 4


def test_an_adapter_registered_again_under_its_id_never_reads_the_old_ones_blocks(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    engine = _engine(tiny_model, tiny_adapters, True)
    prompt = _prompts(engine)[0]
    count_answer = engine.generate([prompt], GREEDY, ["count-r4"])[0].token_ids
    engine.generate([prompt], GREEDY, ["sea-r8"])
    engine.remove_adapter("sea-r8")
    engine.add_adapter("sea-r8", tiny_adapters.paths["count-r4"])  # the same id, other weights
    assert engine.generate([prompt], GREEDY, ["sea-r8"])[0].token_ids == count_answer


def test_prefills_past_a_cached_prefix_are_not_padded_to_a_long_chunk() -> None:
    def item(name: str, num_new: int) -> ScheduledSeq:
        return ScheduledSeq(Sequence(request_id=name, prompt_token_ids=[1] * 600, params=GREEDY, adapter_id=None,
                                     arrival=0), num_new)

    groups = prefill_length_groups([item("hit", 64), item("chunk", 2000), item("cold", 1200), item("tail", 40)])
    assert [[s.seq.request_id for s in g] for g in groups] == [["chunk", "cold"], ["hit", "tail"]]


def test_requests_share_cached_blocks_only_under_the_same_cache_salt(
        tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    """A payer who could see (from the time to a first token) that a block of a guessed prompt is cached
    learns another's prompt; a salt keeps a payer's blocks to requests sent under it."""
    engine = _engine(tiny_model, tiny_adapters, True)
    prompt = _prompts(engine)[1]
    full_blocks = (len(prompt) - 1) // 4
    tables: dict[str, list[int]] = {}
    engine.runner.logits_observer = lambda seqs, _: [tables.setdefault(s.request_id, list(s.block_table))
                                                     for s in seqs]
    hits: dict[str, int] = {}
    for rid, salt in [("alice", "alice-secret"), ("mallory", "mallory-secret"), ("unsalted", None),
                      ("alice-again", "alice-secret"), ("unsalted-again", None)]:
        before = engine.kv_cache_stats().num_hit_tokens
        engine.add_request(prompt, dataclasses.replace(GREEDY, cache_salt=salt), "sea-r8", request_id=rid)
        while engine.has_unfinished():
            engine.step()
        hits[rid] = engine.kv_cache_stats().num_hit_tokens - before
    cached = full_blocks * 4
    assert hits == {"alice": 0, "mallory": 0, "unsalted": 0, "alice-again": cached, "unsalted-again": cached}
    assert tables["alice-again"][:full_blocks] == tables["alice"][:full_blocks]
    for other in ("mallory", "unsalted"):
        assert not set(tables[other][:full_blocks]) & set(tables["alice"][:full_blocks])
    salted = engine.generate([prompt], dataclasses.replace(GREEDY, cache_salt="alice-secret"), ["sea-r8"])
    assert salted[0].token_ids == engine.generate([prompt], GREEDY, ["sea-r8"])[0].token_ids  # same answer


@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_LENGTH + 1)], ids=["empty", "too-long"])
def test_a_cache_salt_out_of_bounds_is_refused(salt: str) -> None:
    with pytest.raises(BadRequest, match="cache_salt"):
        SamplingParams(cache_salt=salt)
