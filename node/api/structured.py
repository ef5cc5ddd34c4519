"""Structured chat answers: the grammar `response_format` or `tools` ask for, and tool calls read back.

- `response_format` `json_object`: the answer is one JSON object; `json_schema`: it matches the schema
  (`strict` true: no properties beyond those the schema lists, unless it allows them).
- `tools` with `tool_choice` `auto` (the default): the model answers in text or calls tools;
  `required`: it calls at least one; a named function: it calls that one; `none`: plain text. Each
  call's arguments match its tool's `parameters`; `parallel_tool_calls` false allows one call only.
  Calls are written as Hermes / Qwen2 templates expect (`<tool_call>` JSON `</tool_call>`) and come
  back as OpenAI `tool_calls` with finish_reason `tool_calls`.
- An answer cut by max_tokens ends with finish_reason `length` and may not parse.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from node.api.schemas import (
    AssistantTurn,
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    SchemaFormat,
    ToolMessage,
)
from node.engine.grammar import MAX_SCHEMA_CHARS, TOOL_CALL_BEGIN, TOOL_CALL_END, GrammarSpec
from node.errors import BadRequest

_CALL = re.compile(re.escape(TOOL_CALL_BEGIN.strip()) + r"\s*(\{.*?\})\s*" + re.escape(TOOL_CALL_END.strip()),
                   re.DOTALL)


@dataclass(frozen=True)
class Constraint:
    """A request's grammar and the request field it comes from (named when it cannot compile)."""

    spec: GrammarSpec
    param: str


def constraint_of(req: ChatCompletionRequest) -> Constraint | None:
    """The grammar the answer must match, or None; BadRequest naming the field for an invalid schema."""
    if req.calls_tools:
        tools = req.tools or []
        chosen = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
        picked = [(i, t) for i, t in enumerate(tools) if chosen in (None, t.function.name)]
        for i, tool in picked:
            _check_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        forced = req.tool_choice == "required" or chosen is not None
        spec = GrammarSpec.tool_calls([(t.function.name, t.function.parameters) for _, t in picked],
                                      is_forced=forced, is_parallel=req.parallel_tool_calls)
        return Constraint(spec, "tools")
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint(GrammarSpec("json_object"), "response_format")
    assert isinstance(fmt, SchemaFormat)
    param = "response_format.json_schema.schema"
    _check_schema(fmt.json_schema.schema_, param)
    return Constraint(GrammarSpec.json_schema(fmt.json_schema.schema_, is_strict=bool(fmt.json_schema.strict)),
                      param)


async def checked_constraint(req: ChatCompletionRequest, threads: Executor) -> Constraint | None:
    """`constraint_of` on `threads` when it has a schema to check (jsonschema's check takes about 0.2 ms per
    subschema: seconds for a body's worth, never on the event loop), else at once."""
    fmt = req.response_format
    if not req.calls_tools and (fmt is None or fmt.type != "json_schema"):
        return constraint_of(req)
    return await asyncio.get_running_loop().run_in_executor(threads, constraint_of, req)


def _check_schema(schema: dict[str, Any], param: str) -> None:
    """BadRequest naming `param` for a schema too long to compile (as GrammarSpec writes it), then for one
    that is not a JSON schema."""
    num_chars = len(json.dumps(schema, separators=(",", ":")))
    if num_chars > MAX_SCHEMA_CHARS:
        raise BadRequest(f"{param} has {num_chars} characters; at most {MAX_SCHEMA_CHARS} are compiled",
                         param=param, num_chars=num_chars, max_chars=MAX_SCHEMA_CHARS)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise BadRequest(f"{param} is not a valid JSON schema at {where}: {exc.message[:200]}",
                         param=param) from exc


@dataclass(frozen=True)
class ChatAnswer:
    """An assistant message as OpenAI returns it: text, tool calls, or both."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def delta(self) -> dict[str, Any]:
        """The same as one stream delta (each call with its index)."""
        delta: dict[str, Any] = {"content": self.content} if self.content else {}
        if self.tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(self.tool_calls)]
        return delta

    def finish_reason(self, ending: str) -> str:
        return "tool_calls" if self.tool_calls and ending == "stop" else ending


def read_answer(text: str, calls_tools: bool, id_prefix: str) -> ChatAnswer:
    """The tool calls in `text` (when tools were offered) and the text around them."""
    if not calls_tools:
        return ChatAnswer(text)
    calls: list[dict[str, Any]] = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1), strict=False)  # a raw control character in a string: escaped below
        except (ValueError, RecursionError):  # the grammar leaves only nesting or an integer too big to read
            continue
        calls.append({"id": f"call_{id_prefix}_{len(calls)}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    content = _CALL.sub("", text).strip() if calls else text
    return ChatAnswer(content or None, calls)


def render_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: an assistant's tool calls with their arguments as objects
    (what Hermes, Qwen2, Llama 3 and Mistral templates expect), a tool's answer with its call id."""
    rendered = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if isinstance(m, AssistantTurn) and m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if isinstance(m, ToolMessage):
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        rendered.append(item)
    return rendered


def _arguments(text: str) -> Any:
    """The JSON of an earlier tool call's arguments; 400 for text that is not JSON, nests deeper than the
    interpreter recurses (node/api/app.py) or writes an integer longer than it converts."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest("an assistant tool call's arguments are not JSON this node reads", param="messages",
                         reason=str(exc)[:200]) from exc


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers tools to a model whose chat template does not render them."""
    return ("You may call the functions below. To call one, answer with\n"
            f'{TOOL_CALL_BEGIN}{{"name": <function name>, "arguments": <arguments object>}}{TOOL_CALL_END}\n'
            "Functions:\n" + "\n".join(json.dumps(t["function"]) for t in tools))
