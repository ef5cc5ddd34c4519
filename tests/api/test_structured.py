"""Tool calls rendered into the prompt (with the chat template when it renders tools, else a system
message) and read back from the answer; the grammars the request fields ask for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.api.engine_client import EngineClient
from node.api.schemas import ChatCompletionRequest
from node.api.structured import constraint_of, read_answer, render_messages
from node.engine import EngineConfig, LLMEngine
from node.errors import BadRequest

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FOLLOW_UP = [
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                  "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                  "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
                  "{% endfor %}\n{% endfor %}[assistant]")


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> EngineClient:
    return EngineClient(LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=2, max_model_len=512)), 4)


def _request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "1", "messages": FOLLOW_UP, **fields})


def test_without_a_template_for_tools_they_are_offered_in_a_system_message(client: EngineClient) -> None:
    tok = client.engine.tokenizer
    prompt = tok.decode(client.encode_chat(render_messages(_request().messages), tools=[TOOL]))
    assert prompt.startswith("<|system|>\nYou may call the functions below.")
    assert '"name": "get_weather"' in prompt  # the tool, and the earlier call written as the model writes it
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<|tool|>\nsunny, 21 C" in prompt


def test_a_template_that_renders_tools_gets_them(client: EngineClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client.engine.tokenizer, "chat_template", TOOLS_TEMPLATE, raising=False)
    prompt = client.engine.tokenizer.decode(client.encode_chat(render_messages(_request().messages), tools=[TOOL]))
    assert prompt.startswith("TOOLS:get_weather;")
    assert 'CALL get_weather {"city": "Oslo"}' in prompt and "[tool]sunny, 21 C" in prompt
    assert "You may call" not in prompt


def test_tool_calls_are_read_back_with_the_text_around_them() -> None:
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os\x03lo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>')
    answer = read_answer(text, calls_tools=True, id_prefix="abc")
    assert answer.content == "Let me check."
    assert [c["id"] for c in answer.tool_calls] == ["call_abc_0", "call_abc_1"]
    assert json.loads(answer.tool_calls[0]["function"]["arguments"]) == {"city": "Os\x03lo"}  # escaped: valid JSON
    assert answer.finish_reason("stop") == "tool_calls" and answer.finish_reason("length") == "length"
    assert read_answer(text, calls_tools=False, id_prefix="x").content == text


def test_the_grammar_follows_tool_choice_and_response_format() -> None:
    auto = constraint_of(_request(tools=[TOOL]))
    assert auto is not None and not auto.spec.is_forced and auto.spec.is_parallel
    named = constraint_of(_request(tools=[TOOL], parallel_tool_calls=False,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named is not None and named.spec.is_forced and not named.spec.is_parallel
    assert constraint_of(_request(tools=[TOOL], tool_choice="none")) is None
    assert constraint_of(_request(response_format={"type": "text"})) is None
    schema = constraint_of(_request(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "strict": True}}))
    assert schema is not None and schema.spec.kind == "json_schema" and schema.spec.is_strict
    with pytest.raises(BadRequest) as refused:
        constraint_of(_request(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}}], tool_choice="required"))
    assert refused.value.facts["param"] == "tools[0].function.parameters"
