"""The sampling pipeline (penalties, logit_bias, min_tokens, logprobs) held against a per-row loop over
plain Python floats, in mixed batches where most rows ask for nothing."""

from __future__ import annotations

import math
import random

import pytest
import torch

from node.engine.logprob import LOGPROB_FLOOR
from node.engine.penalty import TokenCounts, adjust_logits
from node.engine.sampler import Sampler, SamplingBatch
from node.engine.sampling import SamplingParams, sample
from node.errors import BadRequest

VOCAB, EOS = 40, frozenset({2})


def reference_row(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """One row, the way the docstring of node/engine/penalty.py reads."""
    row = list(logits)
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        row[t] += b
    if len(output) < p.min_tokens:
        for t in {*p.stop_token_ids, *(() if p.ignore_eos else EOS)}:
            row[t] = float("-inf")
    return row


def _random_params(rng: random.Random) -> SamplingParams:
    if rng.random() < 0.4:  # a plain request: nothing to adjust
        return SamplingParams(max_tokens=8, temperature=0)
    return SamplingParams(
        max_tokens=8, temperature=0, repetition_penalty=rng.choice([1.0, 0.5, 1.3, 2.0]),
        frequency_penalty=rng.choice([0.0, -1.5, 0.7]), presence_penalty=rng.choice([0.0, 2.0, -0.4]),
        logit_bias={rng.randrange(VOCAB): rng.uniform(-100, 100) for _ in range(rng.randrange(3))},
        min_tokens=rng.randrange(4), stop_token_ids=(rng.randrange(VOCAB),), ignore_eos=rng.random() < 0.2)


@pytest.mark.parametrize("seed", range(6))
def test_adjusted_logits_match_the_per_row_reference(seed: int) -> None:
    rng = random.Random(seed)
    n = 7
    params = [_random_params(rng) for _ in range(n)]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 6))] for _ in range(n)]
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    got = adjust_logits(logits, params, prompts, outputs, EOS)
    for i in range(n):
        want = reference_row(logits[i].tolist(), params[i], prompts[i], outputs[i])
        assert got[i].tolist() == pytest.approx(want, rel=1e-5, abs=1e-4), params[i]


def test_nothing_asked_leaves_the_logits_and_the_greedy_tokens_as_they_were() -> None:
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3))
    plain = [SamplingParams(temperature=0)] * 5
    assert adjust_logits(logits, plain, [[1, 2]] * 5, [[3]] * 5, EOS) is logits
    out = Sampler(EOS)(logits, SamplingBatch(plain, [None] * 5, [[1, 2]] * 5, [[3]] * 5))
    assert out.token_ids == sample(logits, plain, [None] * 5) == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_picks_the_argmax_of_the_adjusted_logits_row_by_row() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 5.0
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={9: 100}),
              SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0)]
    out = Sampler(EOS)(logits, SamplingBatch(params, [None] * 3, [[1]] * 3, [[], [], [7, 7]]))
    assert out.token_ids[0] == 7 and out.token_ids[1] == 9 and out.token_ids[2] != 7  # 5 - 2*2 - 2 < 0


def test_min_tokens_masks_the_end_until_it_is_reached() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 2] = 50.0  # EOS is by far the most likely
    params = [SamplingParams(temperature=0, min_tokens=3)] * 2
    out = Sampler(EOS)(logits, SamplingBatch(params, [None, None], [[1], [1]], [[5, 5], [5, 5, 5]]))
    assert out.token_ids[0] != 2 and out.token_ids[1] == 2


def test_logprobs_are_the_log_softmax_of_the_adjusted_logits_with_the_k_most_likely() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, logprobs=0, presence_penalty=1.0),
              SamplingParams(temperature=0, logprobs=5, min_tokens=2)]
    outputs = [[], [], [4, 4], []]
    out = Sampler(EOS)(logits, SamplingBatch(params, [None, None, torch.Generator().manual_seed(0), None],
                                            [[1]] * 4, outputs))
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        row = reference_row(logits[i].tolist(), params[i], [1], outputs[i])
        norm = math.log(sum(math.exp(x) for x in row if x != float("-inf")))
        want = [max(x - norm, LOGPROB_FLOOR) for x in row]
        got = out.logprobs[i]
        assert got is not None and got.token_id == out.token_ids[i]
        assert got.logprob == pytest.approx(want[out.token_ids[i]], abs=1e-4)
        k = params[i].logprobs or 0
        assert [t for t, _ in got.top] == sorted(range(VOCAB), key=lambda t: -want[t])[:k]
        assert [lp for _, lp in got.top] == pytest.approx(sorted(want, reverse=True)[:k], abs=1e-4)
    masked = out.logprobs[3]
    assert masked is not None and all(t != 2 for t, _ in masked.top)


def test_sampled_rows_draw_from_the_adjusted_distribution() -> None:
    logits = torch.zeros(300, 4)
    params = [SamplingParams(temperature=1.0, logit_bias={3: -100, 0: -100})] * 300
    gen = torch.Generator().manual_seed(1)
    out = Sampler()(logits, SamplingBatch(params, [gen] * 300, [[1]] * 300, [[]] * 300))
    assert set(out.token_ids) == {1, 2}


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                                 dict(repetition_penalty=0.0), dict(logit_bias={5: 101}),
                                 dict(logit_bias={-1: 1}), dict(min_tokens=17), dict(logprobs=21)])
def test_out_of_range_adjustments_are_refused_naming_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(BadRequest) as err:
        SamplingParams(max_tokens=16, **bad)  # type: ignore[arg-type]
    assert err.value.facts["param"] == next(iter(bad))


def test_counts_kept_across_steps_give_the_reference_at_every_step() -> None:
    # the engine keeps each sequence's counts from step to step (penalty.TokenCounts): a step counts only the
    # tokens appended since the last, and the answer must be the one counted afresh from the whole history
    rng = random.Random(7)
    params = [SamplingParams(max_tokens=40, repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=-0.3),
              SamplingParams(max_tokens=40, repetition_penalty=0.7),
              SamplingParams(max_tokens=40, frequency_penalty=1.1)]
    prompts: list[list[int]] = [[rng.randrange(VOCAB) for _ in range(9)] for _ in params]
    outputs: list[list[int]] = [[] for _ in params]
    kept = [TokenCounts(prompt, output) for prompt, output in zip(prompts, outputs, strict=True)]
    for step in range(12):
        logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(step)) * 3
        got = adjust_logits(logits, params, prompts, outputs, EOS, kept)
        for i, p in enumerate(params):
            want = reference_row(logits[i].tolist(), p, prompts[i], outputs[i])
            assert got[i].tolist() == pytest.approx(want, rel=1e-5, abs=1e-4), (step, i)
        for output in outputs:  # one token a step, two now and then: the counts take whatever was appended
            output.extend(rng.randrange(VOCAB) for _ in range(1 + (step % 5 == 4)))
