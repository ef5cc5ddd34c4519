"""Per-request sampling in one batch: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from node.engine.sampling import SamplingParams, sample
from node.errors import BadRequest

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def _draws(params: SamplingParams, n: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    logits = LOGITS.repeat(n, 1)
    return set(sample(logits, [params] * n, [g] * n))


def test_greedy_takes_the_argmax() -> None:
    assert _draws(SamplingParams(temperature=0), n=5) == {0}


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert _draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.75)) == {0, 1}  # 0.5 + 0.3 covers 0.75
    assert _draws(SamplingParams(temperature=1.0, top_p=0.4)) == {0}


def test_rows_use_their_own_params_and_generators() -> None:
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=5.0)
    logits = LOGITS.repeat(4, 1)
    gens = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(1)]
    first = sample(logits, [greedy, hot, greedy, hot], gens)
    assert first[0] == first[2] == 0 and first[1] == first[3]  # same seed, same draw


def test_invalid_params_are_refused() -> None:
    with pytest.raises(BadRequest):
        SamplingParams(max_tokens=0)
    with pytest.raises(BadRequest):
        SamplingParams(top_p=0)
