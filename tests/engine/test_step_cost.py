"""What one step costs the engine's CPU for one sequence must not grow with the sequence's history: a payer
pays per token, so a per-step cost that reads the whole prompt and answer again makes a long answer cost the
node quadratically in its length (and every other payer waits on those steps). Counted, never timed."""

from __future__ import annotations

import tracemalloc
from collections import abc
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams, penalty
from node.engine.block_manager import BlockManager
from node.engine.model_inputs import model_inputs
from node.engine.scheduler import ScheduledSeq
from node.engine.sequence import Sequence

PROMPT_IDS = list(range(3, 203))  # 200 prompt tokens


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=1024))


def test_penalties_read_each_history_token_once_however_long_the_answer(engine: LLMEngine,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    counts = penalty.token_counts

    def counting(histories: list[abc.Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
        read.append(sum(len(h) for h in histories))
        return counts(histories, vocab, device)

    monkeypatch.setattr(penalty, "token_counts", counting)
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=3, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.2)
    out = engine.generate([PROMPT_IDS], params)[0]
    assert out.finish_reason == "length"  # 400 tokens generated (the last may be cut: an unfinished character)
    # the prompt once, each generated token once per table it is counted into (repetition; frequency/presence)
    assert sum(read) <= len(PROMPT_IDS) + 2 * params.max_tokens, sum(read)


def _step_memory(num_prompt: int) -> int:
    """Peak bytes the engine's CPU allocates to lay out one decode step of a sequence with `num_prompt` prompt
    tokens, the step that completes a KV block and registers it in the prefix cache."""
    blocks = BlockManager(num_blocks=num_prompt // 16 + 4, block_size=16, enable_caching=True)
    seq = Sequence(request_id="long", prompt_token_ids=[t % 500 for t in range(num_prompt)], params=SamplingParams(),
                   adapter_id=None, arrival=0)
    seq.output_token_ids.extend(range(15))  # the 16th goes in this step: its block is full once computed
    blocks.grow(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens - 1
    blocks.commit(seq)
    tracemalloc.start()
    try:
        inputs = model_inputs([ScheduledSeq(seq, 1)], [-1], 16)
        seq.num_computed_tokens += 1
        seq.output_token_ids.append(7)
        blocks.commit(seq)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert inputs.token_ids == [14] and seq.num_committed_blocks == seq.num_computed_tokens // 16
    return peak


def test_a_decode_step_copies_no_history() -> None:
    # 1,000 or 100,000 tokens before it, a decode step reads its one new token (a copy of the whole history
    # would be 8 bytes per token: 800 kB here)
    assert _step_memory(100_000 - 15) < _step_memory(1_000 - 15) + 16_000


def test_a_slice_of_the_tokens_is_that_of_the_whole_history() -> None:
    seq = Sequence(request_id="s", prompt_token_ids=[5, 6, 7], params=SamplingParams(), adapter_id=None, arrival=0)
    seq.output_token_ids.extend([8, 9])
    for start in range(6):
        for end in range(start, 6):
            assert seq.tokens(start, end) == seq.token_ids[start:end], (start, end)


def _bias_step_memory(num_entries: int) -> int:
    """Peak bytes of Python objects a step's adjustments allocate for 16 rows of `num_entries` logit_bias
    entries each (the requests' params are the ones of every step before)."""
    params = [SamplingParams(logit_bias={t: 1.5 for t in range(num_entries)})] * 16
    logits, histories = torch.zeros(16, 2048), [[1]] * 16
    penalty.adjust_logits(logits, params, histories, histories, frozenset())  # the first step
    tracemalloc.start()
    try:
        adjusted = penalty.adjust_logits(logits, params, histories, histories, frozenset())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adjusted[:, :num_entries].eq(1.5).all() and adjusted[:, num_entries:].eq(0).all()
    return peak


def test_a_long_logit_bias_is_laid_out_once_not_every_step() -> None:
    # 1,024 entries (the most a request may send) cost a step no more Python objects than one entry does:
    # laid out again each step, 16 rows of them took 16,384 tuples and their numbers (over 1 MB) every token
    assert _bias_step_memory(1024) < _bias_step_memory(1) + 16_000
