"""What one step costs the engine's CPU for one sequence must not grow with the sequence's history: a payer
pays per token, so a per-step cost that reads the whole prompt and answer again makes a long answer cost the
node quadratically in its length (and every other payer waits on those steps). Counted, never timed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from node.engine import EngineConfig, LLMEngine, SamplingParams, penalty

PROMPT_IDS = list(range(3, 203))  # 200 prompt tokens


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=4, max_model_len=1024))


def test_penalties_read_each_history_token_once_however_long_the_answer(engine: LLMEngine,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    counts = penalty.token_counts

    def counting(histories: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
        read.append(sum(len(h) for h in histories))
        return counts(histories, vocab, device)

    monkeypatch.setattr(penalty, "token_counts", counting)
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=3, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.2)
    out = engine.generate([PROMPT_IDS], params)[0]
    assert out.finish_reason == "length"  # 400 tokens generated (the last may be cut: an unfinished character)
    # the prompt once, each generated token once per table it is counted into (repetition; frequency/presence)
    assert sum(read) <= len(PROMPT_IDS) + 2 * params.max_tokens, sum(read)
