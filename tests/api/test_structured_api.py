"""Structured output and tools through the official `openai` client against a live paid node: the
tiny model writes garbage, so every well-formed answer below is the grammar's doing."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from node.client.payer import Payer, verify_receipt
from tests.fixtures.json_schemas import SCHEMAS
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain

CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]


class Boat(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["sail", "row", "steam"]
    crew: int = Field(ge=0, le=40)
    sea_worthy: bool
    ports: list[Literal["Oslo", "Lima"]] = Field(max_length=2)


def _payer(node: PaidNode) -> Payer:
    return Payer(node.payer_keys[1], node.base_url)


def _client(node: PaidNode, lane: int) -> Any:
    return _payer(node).openai(lane=lane)


def _charged(node: PaidNode, lane: int) -> int:
    return int(_payer(node).channel(lane)["chargedTotal"])


def test_parse_with_a_pydantic_model_returns_a_paid_valid_instance(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    out = payer.openai(lane=10).chat.completions.parse(
        model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "describe a boat"}],
        response_format=Boat, max_tokens=200, temperature=0.8, seed=4)
    boat = out.choices[0].message.parsed
    assert isinstance(boat, Boat) and out.choices[0].finish_reason == "stop"
    receipt = out.model_extra["receipt"]
    assert verify_receipt(receipt, payer.info.domain) == payer.info.node
    assert receipt["completionTokens"] == out.usage.completion_tokens
    assert int(receipt["chargedTotal"]) == _charged(paid_node, 10)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_streamed_json_schema_answer_validates(paid_node: PaidNode, seed: int) -> None:
    stream = _client(paid_node, 11).chat.completions.create(
        model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "a trip"}], stream=True,
        max_tokens=200, temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": CITY, "strict": True}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["receipt"]
    jsonschema.validate(json.loads(text), CITY)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, stream=st.booleans(), seed=st.integers(0, 1000))
def test_every_paid_answer_validates_against_its_schema_streamed_or_not(paid_node: PaidNode, schema: dict[str, Any],
                                                                         stream: bool, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "any", "schema": schema, "strict": True}}
    args = {"model": str(paid_node.adapter_id), "messages": [{"role": "user", "content": "answer"}],
            "response_format": fmt, "max_tokens": 300, "temperature": 1.0, "seed": seed}
    client = _client(paid_node, 18)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = client.chat.completions.create(**args)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_answers_one_object(paid_node: PaidNode) -> None:
    out = _client(paid_node, 12).chat.completions.create(
        model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=1.0, seed=5)
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_required_tool_calls_come_back_as_tool_calls_and_the_follow_up_is_accepted(paid_node: PaidNode) -> None:
    client = _client(paid_node, 13)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather in Oslo, and 2 + 3?"}]
    out = client.chat.completions.create(model=str(paid_node.adapter_id), messages=messages, tools=TOOLS,
                                         tool_choice="required", max_tokens=300, temperature=1.0, seed=6)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), {"get_weather": CITY, "add": ADD}[call.function.name])
    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in choice.message.tool_calls]
    follow = client.chat.completions.create(model=str(paid_node.adapter_id), messages=messages, tools=TOOLS,
                                            max_tokens=8, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert follow.usage.prompt_tokens > out.usage.prompt_tokens  # the calls and their answers were rendered


def test_a_named_function_without_parallel_calls_is_called_once_also_streamed(paid_node: PaidNode) -> None:
    stream = _client(paid_node, 14).chat.completions.create(
        model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "add"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False,
        max_tokens=300, temperature=1.0, seed=7, stream=True)
    chunks = list(stream)
    calls = [c for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "add"
    jsonschema.validate(json.loads(calls[0].function.arguments), ADD)


def test_tool_choice_none_answers_text(paid_node: PaidNode) -> None:
    out = _client(paid_node, 15).chat.completions.create(
        model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
        tool_choice="none", max_tokens=6, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


def _post(node: PaidNode, path: str, payload: dict[str, Any], lane: int) -> httpx.Response:
    body = json.dumps({"model": str(node.adapter_id), **payload}).encode()
    header = _payer(node).payment_header(body, lane)
    return httpx.post(f"{node.base_url}/v1/{path}", content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"})


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path, payload, param", [
    ("chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 5}}}}}},
     "response_format.json_schema.schema"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "required": "a"}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ("chat/completions", {**CHAT, "tool_choice": "required"}, "body"),
    ("chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "body"),
    ("completions", {"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_constraint_that_cannot_be_applied_is_refused_before_any_charge(
        paid_node: PaidNode, path: str, payload: dict[str, Any], param: str) -> None:
    before = _charged(paid_node, 16)
    resp = _post(paid_node, path, payload, 16)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert _charged(paid_node, 16) == before
    ok = _post(paid_node, "chat/completions", CHAT, 16)  # nothing held: the lane goes on at once
    assert ok.status_code == 200, ok.text


def test_a_refused_client_side_error_is_an_openai_bad_request(paid_node: PaidNode) -> None:
    with pytest.raises(openai.BadRequestError):
        _client(paid_node, 17).chat.completions.create(
            model=str(paid_node.adapter_id), messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "no"}}})


def test_a_streamed_tool_call_answer_replays_the_same_calls_for_free(paid_node: PaidNode) -> None:
    body = json.dumps({"model": str(paid_node.adapter_id), "messages": [{"role": "user", "content": "add"}],
                       "tools": TOOLS, "tool_choice": "required", "max_tokens": 300, "seed": 8,
                       "stream": True}).encode()
    header = _payer(paid_node).payment_header(body, 19)

    def calls() -> tuple[list[Any], dict[str, Any]]:
        resp = httpx.post(f"{paid_node.base_url}/v1/chat/completions", content=body, timeout=60,
                          headers={"X-Payment": header, "Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text
        events = [json.loads(line[6:]) for line in resp.text.splitlines()
                  if line.startswith("data: {")]
        found = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
        return found, events[-1]

    first, last = calls()
    again, last_again = calls()
    assert first and again == first and last_again["choices"][0]["finish_reason"] == "tool_calls"
    assert _charged(paid_node, 19) == int(last["receipt"]["fee"])  # charged once
