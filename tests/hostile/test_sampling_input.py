"""Any sampling parameters the API lets through give a token for every row, and never fail the batch
(a failing step fails every request in it, so one hostile request must not be able to cause one)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from node.engine.sampling import SamplingParams, sample

VOCAB = 50

params = st.builds(SamplingParams, temperature=st.floats(0.0, 2.0), top_k=st.integers(-1, 2**31 - 1),
                   top_p=st.floats(0.0, 1.0, exclude_min=True), seed=st.none() | st.integers(0, 2**63 - 1))
logits = st.lists(st.floats(-1e4, 1e4, width=32), min_size=VOCAB, max_size=VOCAB)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(params, logits), min_size=1, max_size=4))
def test_any_api_sampling_params_give_a_token_per_row(rows: list[tuple[SamplingParams, list[float]]]) -> None:
    batch = torch.tensor([row for _, row in rows], dtype=torch.float32)  # [N, vocab]
    ids = sample(batch, [p for p, _ in rows], [None] * len(rows))
    assert len(ids) == len(rows) and all(0 <= i < VOCAB for i in ids)


def test_a_top_k_past_what_the_engine_holds_is_refused_by_the_api_and_clamped_by_the_sampler() -> None:
    import pytest
    from pydantic import ValidationError

    from node.api.schemas import CompletionRequest

    with pytest.raises(ValidationError):  # the fuzzer's case: 9,557,782,413,140,389,888 failed the whole batch
        CompletionRequest(model="1", prompt="x", top_k=2**63)
    assert CompletionRequest(model="1", prompt="x", top_k=2**31 - 1).top_k == 2**31 - 1
    assert sample(torch.tensor([[0.0, 5.0, 1.0]]), [SamplingParams(top_k=2**62)], [None])[0] in (0, 1, 2)


def test_a_vanishing_temperature_is_greedy_not_a_failed_step() -> None:
    batch = torch.tensor([[0.5, 3.0, -1.0], [2.0, 0.0, 1.0]])
    tiny = SamplingParams(temperature=3.7e-86)  # the fuzzer's case: logits / t overflowed to inf -> NaN
    assert tiny.is_greedy
    assert sample(batch, [tiny, SamplingParams(temperature=1e-300)], [None, None]) == [1, 0]


adjusted = st.builds(SamplingParams, max_tokens=st.just(8), temperature=st.floats(0.0, 2.0),
                     top_p=st.floats(0.0, 1.0, exclude_min=True),
                     repetition_penalty=st.floats(0.01, 10.0), frequency_penalty=st.floats(-2.0, 2.0),
                     presence_penalty=st.floats(-2.0, 2.0), min_tokens=st.integers(0, 8),
                     logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100.0, 100.0), max_size=VOCAB),
                     stop_token_ids=st.lists(st.integers(0, VOCAB - 1), max_size=3).map(tuple),
                     logprobs=st.none() | st.integers(0, 20))
history = st.lists(st.integers(0, VOCAB - 1), max_size=12)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(adjusted, logits, history, history), min_size=1, max_size=4))
def test_any_penalties_bias_min_tokens_and_logprobs_give_a_token_and_finite_logprobs(
        rows: list[tuple[SamplingParams, list[float], list[int], list[int]]]) -> None:
    from node.engine.sampler import Sampler, SamplingBatch

    batch = torch.tensor([row for _, row, _, _ in rows], dtype=torch.float32)  # [N, vocab]
    params = [p for p, _, _, _ in rows]
    out = Sampler(frozenset({0}))(batch, SamplingBatch(params, [None] * len(rows), [r[2] for r in rows],
                                                      [r[3] for r in rows]))
    assert len(out.token_ids) == len(rows) and all(0 <= i < VOCAB for i in out.token_ids)
    for p, lp in zip(params, out.logprobs, strict=True):
        assert (lp is None) == (p.logprobs is None)
        if lp is not None:
            assert all(-1e4 <= x <= 0 for x in [lp.logprob, *(v for _, v in lp.top)])
