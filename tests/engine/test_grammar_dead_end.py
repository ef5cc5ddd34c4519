"""A grammar that leads to a place where no token is allowed ends its own answer there, never the batch.

xgrammar matches a schema's `pattern` against the raw text of a JSON string, so `"pattern": "^\\n$"`
asks for a raw newline, which the engine's JSON masks forbid (JSON writes it escaped): after the opening
quote no token is allowed at all. Sampled, that row's probabilities were NaN, `torch.multinomial` raised
and the step failed: every request in the batch ended with "error" (each a node fault: nothing charged,
a streamed answer's tokens free), again and again for anyone who sent that schema; under greedy
decoding the row took token 0, outside its grammar, for the rest of its max_tokens (charged). Now the
row is reported by the sampler and its answer ends before that place, cut as an answer at its length
is (finish "length", charged for the tokens it generated); the other rows are sampled as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.grammar import GrammarSpec

RAW_NEWLINE = {"type": "string", "pattern": "^\n$"}  # a raw control character: JSON never holds one
# free text first, the dead end after it: an answer whose failure was free would be a free answer
FREE_TEXT_THEN_DEAD_END = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 8},
                                                            "z": {"type": "string", "pattern": "^\t$"}},
                           "required": ["note", "z"]}


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=256))
    engine.start()  # the step loop the API runs: a failed step fails every request in it
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_grammar_with_no_allowed_token_ends_its_answer_alone(engine: LLMEngine, temperature: float) -> None:
    honest = SamplingParams(max_tokens=24, temperature=1.0, seed=1)
    poison = SamplingParams(max_tokens=24, temperature=temperature, seed=2,
                            grammar=GrammarSpec.json_schema(RAW_NEWLINE))
    outs = engine.generate(["The sea"] * 4, [honest, poison, honest, poison])
    for out in outs[0::2]:  # the requests batched with it are served whole
        assert (out.finish_reason, out.error, out.num_completion_tokens) == ("length", None, 24)
    for out in outs[1::2]:  # the opening quote, then nothing the grammar allows: the answer ends there
        assert (out.finish_reason, out.error) == ("length", None), out
        assert out.text == '"' and out.token_ids == engine.tokenizer('"').input_ids


def test_an_answer_that_reaches_its_dead_end_after_free_text_keeps_and_counts_that_text(engine: LLMEngine) -> None:
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, grammar=GrammarSpec.json_schema(
        FREE_TEXT_THEN_DEAD_END)) for s in range(4)]
    for out in engine.generate(["The sea"] * len(params), params):
        assert (out.finish_reason, out.error) == ("length", None), out
        assert out.text.startswith('{"note": "') and out.text.endswith('"z": "'), out.text
        assert out.num_completion_tokens == len(out.token_ids) > 6
        assert engine.tokenizer.decode(out.token_ids) == out.text  # every token it counts is in its text
