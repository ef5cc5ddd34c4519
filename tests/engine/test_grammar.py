"""Grammar-constrained generation: a tiny random model writes garbage, so the grammar does all the work.

Every answer that ends must parse and validate against its schema; under greedy decoding every token
must be the argmax of the unconstrained logits among the tokens the grammar allows, checked against
a reference that tries each token of the whole vocabulary on its own copy of the grammar.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.grammar import TOOL_CALL_BEGIN, TOOL_CALL_END, GrammarSpec
from node.engine.sampling import apply_token_bitmask
from node.engine.sequence import Sequence
from node.errors import BadRequest
from tests.fixtures.json_schemas import SCHEMAS


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=512))


def _constrained(schema: dict[str, Any], temperature: float, seed: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=300, temperature=temperature, seed=seed, grammar=GrammarSpec.json_schema(schema))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(schemas=st.lists(SCHEMAS, min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_every_answer_parses_and_validates_against_its_schema(engine: LLMEngine, schemas: list[dict[str, Any]],
                                                             seed: int) -> None:
    # greedy and sampled answers of each schema share one batch with an unconstrained request
    params = [_constrained(s, t, seed) for s in schemas for t in (0.0, 1.0)]
    params.append(SamplingParams(max_tokens=20, temperature=1.0, seed=seed))
    outs = engine.generate(["The sea at night"] * len(params), params)
    for out, p in zip(outs[:-1], params[:-1], strict=True):
        assert out.finish_reason == "stop", out.text
        assert p.grammar is not None
        jsonschema.validate(json.loads(out.text), json.loads(p.grammar.schema))
    assert outs[-1].num_completion_tokens > 0


def test_greedy_tokens_are_the_argmax_among_the_tokens_the_grammar_allows(engine: LLMEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                               "n": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "kind": {"enum": ["sea", "boat"]}},
              "required": ["city", "kind"], "additionalProperties": False}
    spec = GrammarSpec.json_schema(schema)
    seen: list[tuple[int, torch.Tensor]] = []  # (row of the constrained sequence, its unconstrained logits)

    def observe(seqs: list[Sequence], logits: torch.Tensor) -> None:
        for i, seq in enumerate(seqs):
            if seq.grammar is not None:
                seen.append((i, logits[i].clone()))

    engine.runner.logits_observer = observe
    try:
        free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        outs = engine.generate(["Seven small boats", "The river", "Stars"],
                               [free, SamplingParams(max_tokens=300, temperature=0, grammar=spec), free])
    finally:
        engine.runner.logits_observer = None
    out = outs[1]
    assert out.finish_reason == "stop" and len(seen) == len(out.token_ids)
    jsonschema.validate(json.loads(out.text), schema)
    reference = engine.grammars.state(spec)
    eos = engine.tokenizer.eos_token_id
    for (_, logits), token in zip(seen, out.token_ids, strict=True):
        allowed = [t for t in range(logits.shape[-1]) if reference.allows(t)]
        assert (eos in allowed) == reference.is_complete  # the stop token only once the answer is whole
        best = max(allowed, key=lambda t: logits[t].item())
        assert token == best
        assert reference.accept(token)
    assert out.token_ids[-1] == eos


def test_the_bitmask_keeps_exactly_the_allowed_tokens_of_its_rows() -> None:
    logits = torch.zeros(3, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5  # token 5
    bitmask[1, 2] = 1 << 3  # token 67
    bitmask[1, 1] = -(1 << 31)  # token 63 (the sign bit)
    apply_token_bitmask(logits, bitmask, [0, 2])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(logits[1]).all()
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [63, 67]


def test_bounded_strings_hold_no_raw_control_characters(engine: LLMEngine) -> None:
    """xgrammar 0.2.9 lets raw control bytes into strings with a maxLength; JSON forbids them."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    outs = engine.generate(["The sea"] * 8, [SamplingParams(max_tokens=100, temperature=1.5, seed=s,
                                                             grammar=GrammarSpec.json_schema(schema))
                                              for s in range(8)])
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)  # json.loads refuses a raw control character


_SHORT_NAME = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 2}}, "required": ["name"],
               "additionalProperties": False}


def _surrogate_bytes_favoured(engine: LLMEngine, temperature: float, seed: int) -> SamplingParams:
    """The single-byte tokens of ED, A0 and 80 (the surrogate U+D800) favoured by a large bias."""
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.grammars.vocab_size)
    byte_token = {data[0]: i for i, data in reversed(list(enumerate(info.decoded_vocab))) if len(data) == 1}
    bias = {byte_token[0xED]: 100.0, byte_token[0xA0]: 100.0, byte_token[0x80]: 100.0}
    return SamplingParams(max_tokens=60, temperature=temperature, seed=seed, logit_bias=bias,
                          grammar=GrammarSpec.json_schema(_SHORT_NAME))


def test_strings_hold_only_valid_utf8_even_where_surrogate_bytes_are_favoured(engine: LLMEngine) -> None:
    """xgrammar 0.2.9 counts the bytes of a surrogate (ED A0 80) as one character: "2" and one of them
    passed a maxLength of 2 and decoded to 4 characters ("2" and three U+FFFD)."""
    schema = _SHORT_NAME
    params = [_surrogate_bytes_favoured(engine, t, s) for t in (0.0, 1.0) for s in range(3)]
    outs = engine.generate(["The sea"] * len(params), params)
    for out in outs:
        assert out.finish_reason == "stop" and "\ufffd" not in out.text, out.text
        jsonschema.validate(json.loads(out.text), schema)
    greedy = json.loads(outs[0].text)["name"].encode()
    assert greedy and set(greedy) <= {0xED, 0xA0, 0x80}  # the favoured bytes, where they are valid UTF-8


def test_a_streamed_answer_holds_back_a_character_split_across_tokens(tiny_model: Path) -> None:
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=2, max_model_len=256))
    params = _surrogate_bytes_favoured(engine, 0.0, 0)
    whole = engine.generate(["The sea"], [params])[0]

    async def consume() -> list[str]:
        return [d.text async for d in engine.stream("The sea", params)]

    try:
        texts = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert "".join(texts) == whole.text and len(json.loads(whole.text)["name"]) == 2
    assert not any("\ufffd" in text for text in texts), texts  # each character whole, in one delta


def test_json_object_and_a_cut_answer(engine: LLMEngine) -> None:
    free_text = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    outs = engine.generate(["The sea", "The sea"], [
        SamplingParams(max_tokens=200, temperature=1.0, seed=3, grammar=GrammarSpec("json_object")),
        SamplingParams(max_tokens=6, temperature=1.0, seed=3, grammar=GrammarSpec.json_schema(free_text))])
    assert outs[0].finish_reason == "stop" and isinstance(json.loads(outs[0].text), dict)
    assert outs[1].finish_reason == "length" and outs[1].text.startswith('{"note')
    with pytest.raises(json.JSONDecodeError):  # max_tokens cut the answer: it does not parse
        json.loads(outs[1].text)


def test_forced_tool_calls_follow_the_tools_schemas(engine: LLMEngine) -> None:
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
           "required": ["a"], "additionalProperties": False}
    spec = GrammarSpec.tool_calls([("get_weather", weather), ("add", add)], is_forced=True, is_parallel=False)
    outs = engine.generate(["Call a tool"] * 4, [SamplingParams(max_tokens=200, temperature=1.0, seed=s,
                                                                 grammar=spec) for s in range(4)])
    for out in outs:
        assert out.finish_reason == "stop" and out.text.startswith(TOOL_CALL_BEGIN)
        assert out.text.endswith(TOOL_CALL_END) and out.text.count(TOOL_CALL_END) == 1
        call = json.loads(out.text.removeprefix(TOOL_CALL_BEGIN).removesuffix(TOOL_CALL_END))
        jsonschema.validate(call["arguments"], {"get_weather": weather, "add": add}[call["name"]])


def _nested(levels: int) -> dict[str, Any]:
    """An object in an object ... `levels` deep (compile time grows with the square of the depth)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("schema, message", [
    ({"type": "objekt"}, "cannot be compiled"),
    ({"type": "string", "pattern": "(unclosed"}, "cannot be compiled"),
    (_nested(40), "levels deep"),
    ({"enum": ["x" * 70_000]}, "characters"),
    ({"type": "string", "pattern": "[a-z]{1,3000}"}, "add up to 3000"),
    ({"type": "string", "pattern": "([a-z]{1,60}){2,60}"}, "add up to 3600"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-z]{1,600}"},  # each in bounds
                                       "b": {"type": "string", "pattern": "[0-9]{1,600}"}}}, "add up to 1200"),
])
def test_a_schema_that_cannot_compile_is_refused_before_the_engine_queues_it(
        engine: LLMEngine, schema: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        engine.add_request("hi", SamplingParams(grammar=GrammarSpec.json_schema(schema)))
    assert not engine.has_unfinished()


def test_compiled_grammars_are_cached_per_schema(engine: LLMEngine) -> None:
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"cached": {"type": "boolean"}}})
    assert not engine.grammars.is_cached(spec)
    first = engine.grammars.compile(spec)
    assert engine.grammars.is_cached(spec) and engine.grammars.compile(spec) is first


def test_the_tools_of_one_request_share_one_bound_on_pattern_repetition(engine: LLMEngine) -> None:
    params = {"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]{1,600}"}}}  # in bounds
    spec = GrammarSpec.tool_calls([("one", params), ("two", params)], is_forced=True, is_parallel=False)
    with pytest.raises(BadRequest, match=r"tool two .* add up to 600; at most 424 more"):
        engine.add_request("hi", SamplingParams(grammar=spec))
    assert not engine.has_unfinished()
