"""The request fields this node does not apply, in one table: each is refused with a 400 naming it
(`error.param`) unless its value asks for nothing, before any voucher is checked or hold is taken. A
paid API must never charge for a constraint it did not apply.

Every other field of OpenAI's chat and completions requests is declared in node/api/schemas.py and
honoured; a field that is neither (a typo, a newer OpenAI field, another server's extension) is
refused too, so nothing is ever silently ignored. tests/api/test_request_fields.py walks OpenAI's
published request schemas (from the installed `openai` package) against a live paid node.

To serve one of these fields: declare it in schemas.py, apply it, and delete its line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from node.errors import BadRequest


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, dict, str)) and not value)


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: _is_empty(value) or any(value == v and type(value) is type(v) for v in values)


@dataclass(frozen=True)
class NotApplied:
    reason: str
    asks_nothing: Callable[[Any], bool] = _is_empty  # the values that leave the answer as it would be


CHAT_ONLY, FUNCTIONS = "it is a chat field: send it to /v1/chat/completions", "the deprecated functions API: use tools"
NOT_APPLIED: dict[str, NotApplied] = {
    # structured output and tools: applied on chat, where they are declared (schemas.ChatCompletionRequest)
    "response_format": NotApplied(CHAT_ONLY, _one_of({"type": "text"})),
    "tools": NotApplied(CHAT_ONLY),
    "tool_choice": NotApplied(CHAT_ONLY, _one_of("none")),
    "parallel_tool_calls": NotApplied(CHAT_ONLY),
    "functions": NotApplied(FUNCTIONS),
    "function_call": NotApplied(FUNCTIONS, _one_of("none")),
    # what this node does not serve
    "audio": NotApplied("audio output is not served"),
    "modalities": NotApplied("only text is served", _one_of(["text"])),
    "prediction": NotApplied("predicted outputs are not served"),
    "reasoning_effort": NotApplied("the served models do not reason"),
    "verbosity": NotApplied("the served models take no verbosity setting"),
    "web_search_options": NotApplied("web search is not served"),
    "moderation": NotApplied("moderation is not served"),
    "prompt_cache_options": NotApplied("prompt caching cannot be configured"),
    "prompt_cache_retention": NotApplied("prompt caching cannot be configured"),
    "store": NotApplied("answers are kept for their payer only (see docs/api.md)", _one_of(False)),
    "service_tier": NotApplied("one service tier is served", _one_of("auto", "default")),
    "echo": NotApplied("the prompt is not echoed", _one_of(False)),
    "suffix": NotApplied("insertion (suffix) is not served"),
    "best_of": NotApplied("best_of is not served; n > 1 returns every choice", _one_of(1)),
}


def refuse_unapplied(extra_fields: Mapping[str, Any]) -> None:
    """Raise BadRequest (400, `param` = the field) for the first field that is not applied."""
    for name, value in extra_fields.items():
        field = NOT_APPLIED.get(name)
        if field is None:
            raise BadRequest(f"{name} is not a request field this node knows: it would be ignored", param=name)
        if not field.asks_nothing(value):
            raise BadRequest(f"{name} is not applied by this node: {field.reason}", param=name)
