"""Any batch of requests the API can send, structured answers among them, is served request by request:
no combination of grammars (patterns that ask for control characters, non-ASCII, nothing at all),
sampling settings, penalties, biases, min_tokens, stop strings and logprobs fails an engine step, which
would end every request in it as a node fault (tests/engine/test_grammar_dead_end.py is one found so)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.grammar import GrammarSpec

VOCAB = 512  # the tiny model's
PATTERNS = ["^\n$", "^[a-z]{0,4}$", "^\t?$", "^\\x01$", "^\\s$", "^[^a-z]$", "^.$", "^é$", "^😀$", "^\\u2028$",
            '^"$', "^\\\\$", "^[\\x80-\\xff]$", "^\\d{2}$"]


def _grammar(pattern: str, kind: int) -> GrammarSpec:
    field = {"type": "string", "pattern": pattern}
    if kind == 0:
        return GrammarSpec.json_schema(field)
    if kind == 1:
        return GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3},
                                                                        "b": field}, "required": ["a", "b"]})
    return GrammarSpec.tool_calls([("f", {"type": "object", "properties": {"x": field}, "required": ["x"]})],
                                  is_forced=kind == 2, is_parallel=True)


@st.composite
def _params(draw: st.DrawFn) -> SamplingParams:
    max_tokens = draw(st.integers(1, 24))
    grammar = draw(st.none() | st.builds(_grammar, st.sampled_from(PATTERNS), st.integers(0, 3)))
    return SamplingParams(
        max_tokens=max_tokens, temperature=draw(st.sampled_from([0.7, 0.0, 1e-5, 2.0])),
        top_p=draw(st.sampled_from([1.0, 0.5, 1e-9])), top_k=draw(st.sampled_from([0, 1, 5, 2**31 - 1])),
        seed=draw(st.none() | st.integers(0, 2**63 - 1)),
        stop=tuple(draw(st.lists(st.sampled_from(["\n", "a", "é", '"', "}", "x" * 40]), max_size=3))),
        repetition_penalty=draw(st.sampled_from([1.0, 0.01, 10.0])),
        frequency_penalty=draw(st.sampled_from([0.0, -2.0, 2.0])), presence_penalty=draw(st.sampled_from([0.0, 2.0])),
        logit_bias=draw(st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([-100.0, 100.0]), max_size=4)),
        min_tokens=draw(st.integers(0, max_tokens)), logprobs=draw(st.sampled_from([None, 0, 20])), grammar=grammar)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=256))
    engine.start()  # the API's step loop: a failed step fails every request in it
    try:
        yield engine
    finally:
        engine.shutdown()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(batch=st.lists(_params(), min_size=1, max_size=6))
def test_no_batch_of_api_requests_fails_an_engine_step(engine: LLMEngine, batch: list[SamplingParams]) -> None:
    outs = engine.generate(["The sea"] * len(batch), batch)
    assert [(o.finish_reason, o.error) for o in outs if o.finish_reason not in ("stop", "length")] == []
    for out, params in zip(outs, batch, strict=True):
        assert 0 < len(out.token_ids) <= params.max_tokens or out.finish_reason == "stop"
        if params.grammar is not None:  # token 0 (<unk>) is in no grammar: it was drawn from a row with none allowed
            assert 0 not in out.token_ids, out
