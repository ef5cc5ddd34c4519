"""Every field of OpenAI's published chat and completions request schemas (read from the installed
`openai` package, so that a new field fails this test until it is decided) is either honoured, as
documented, or refused with a 400 naming it in `error.param` before any hold: a refusal charges
nothing and leaves the lane free. The official client against a live paid node."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from node.client.payer import Payer
from node.engine.sampling import MAX_CACHE_SALT_LENGTH
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PROMPT_PRICE, COMPLETION_PRICE = 10**9, 2 * 10**9
Ask = Callable[..., Any]  # the base request with these fields set -> the answer (a list of chunks if streamed)


def published(module: Any) -> set[str]:
    """The request fields OpenAI's client sends to this endpoint (streamed or not)."""
    keys: set[str] = set()
    for params in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        keys |= params.__required_keys__ | params.__optional_keys__
    return keys


@dataclass(frozen=True)
class Case:
    check: Callable[[Ask, Any], None] | None = None  # (ask, the base answer): what the field does
    refused: Any = None  # a value that asks for what the node does not apply: 400 naming the field


def text_of(out: Any, i: int = 0) -> str:
    if isinstance(out, list):  # a stream's chunks
        return "".join((c.choices[0].delta.content if hasattr(c.choices[0], "delta") else c.choices[0].text) or ""
                       for c in out if c.choices and c.choices[0].index == i)
    return out.choices[i].message.content if hasattr(out.choices[i], "message") else out.choices[i].text


# --- what each honoured field does ---------------------------------------------------------------
def _model(ask: Ask, base: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        ask(model="987654")  # the model names the adapter that serves the request


def _max_tokens(name: str) -> Callable[[Ask, Any], None]:
    def check(ask: Ask, base: Any) -> None:
        # 4, not 3: the tiny model's third chat token is a lone UTF-8 lead byte, an unfinished character that
        # an answer cut right after it leaves out (and does not charge: tests/engine/test_output.py)
        out = ask(**{name: 4})
        assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
        assert text_of(base).startswith(text_of(out))
    return check


def _n(ask: Ask, base: Any) -> None:
    out = ask(n=3)
    assert [c.index for c in out.choices] == [0, 1, 2] and all(text_of(out, i) == text_of(base) for i in range(3))
    assert out.usage.completion_tokens == 3 * base.usage.completion_tokens  # greedy: three equal answers


def _penalty(name: str) -> Callable[[Ask, Any], None]:
    return lambda ask, base: _differ(text_of(ask(**{name: 2.0})), text_of(base))


def _differ(a: str, b: str) -> None:
    assert a != b, a


def _logit_bias(ask: Ask, base: Any) -> None:
    out = ask(logit_bias={"42": 100}, max_tokens=4)
    assert text_of(out) != text_of(base) and len(set(text_of(out).split())) <= 1, text_of(out)


def _seed(ask: Ask, base: Any) -> None:
    a, b, c = (ask(seed=s, temperature=1.0) for s in (7, 7, 8))
    assert text_of(a) == text_of(b) != text_of(c)


def _temperature(ask: Ask, base: Any) -> None:
    assert text_of(ask(temperature=0.0)) == text_of(base)
    assert text_of(ask(temperature=2.0, seed=3)) != text_of(base)


def _top_p(ask: Ask, base: Any) -> None:
    assert text_of(ask(top_p=1e-9, temperature=1.0, seed=3)) == text_of(base)  # only the most likely token


def _stop(ask: Ask, base: Any) -> None:
    full = text_of(base)
    stop = full[len(full) // 2:][:3]
    assert text_of(ask(stop=[stop])) == full[:full.index(stop)]


def _stream(ask: Ask, base: Any) -> None:
    chunks = ask(stream=True)
    assert text_of(chunks) == text_of(base) and chunks[-1].usage.completion_tokens == base.usage.completion_tokens


def _stream_options(ask: Ask, base: Any) -> None:
    chunks = ask(stream=True, stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens == base.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as err:
        ask(stream=True, stream_options={"include_obfuscation": True})
    assert err.value.param == "stream_options.include_obfuscation"


def _label(name: str, value: Any) -> Case:
    """An identifier for the caller's own bookkeeping: the answer is the same with it."""
    return Case(lambda ask, base: _same(text_of(ask(**{name: value})), text_of(base)))


def _same(a: str, b: str) -> None:
    assert a == b, (a, b)


def _chat_logprobs(ask: Ask, base: Any) -> None:
    out = ask(logprobs=True)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and all(t.top_logprobs == [] for t in content)
    assert all(t.logprob <= 0 and bytes(t.bytes) == t.token.encode() for t in content)
    assert ask(logprobs=False).choices[0].logprobs is None


def _top_logprobs(ask: Ask, base: Any) -> None:
    out = ask(logprobs=True, top_logprobs=4)
    for token in out.choices[0].logprobs.content:
        assert len(token.top_logprobs) == 4 and token.top_logprobs[0].logprob >= token.logprob  # greedy
    with pytest.raises(openai.BadRequestError) as err:
        ask(top_logprobs=4)  # without logprobs: OpenAI refuses it too
    assert err.value.param == "top_logprobs"


def _completion_logprobs(ask: Ask, base: Any) -> None:
    lp = ask(logprobs=3).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == base.usage.completion_tokens
    assert all(len(top) <= 3 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert all(token_lp <= 0 for token_lp in lp.token_logprobs)


def _messages(ask: Ask, base: Any) -> None:
    out = ask(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea"}])
    assert out.usage.prompt_tokens > base.usage.prompt_tokens


def _prompt(ask: Ask, base: Any) -> None:
    assert ask(prompt="the sea is long and").usage.prompt_tokens > base.usage.prompt_tokens


FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": FLAG}} for name in ("f", "g")]


def _response_format(ask: Ask, base: Any) -> None:
    out = ask(response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG, "strict": True}},
              max_tokens=200, temperature=1.0, seed=3)
    assert out.choices[0].finish_reason == "stop"
    assert set(json.loads(text_of(out))) == {"ok"}  # the tiny model writes no JSON by itself


def _calls(out: Any) -> list[tuple[str, dict[str, Any]]]:
    assert out.choices[0].finish_reason == "tool_calls", out.choices[0]
    return [(c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls]


def _tools(ask: Ask, base: Any) -> None:
    calls = _calls(ask(tools=TOOLS[:1], tool_choice="required", max_tokens=300, temperature=1.0, seed=4))
    assert calls and all(name == "f" and set(args) == {"ok"} for name, args in calls)


def _tool_choice(ask: Ask, base: Any) -> None:
    named = {"type": "function", "function": {"name": "g"}}
    calls = _calls(ask(tools=TOOLS, tool_choice=named, max_tokens=300, temperature=1.0, seed=5))
    assert calls and all(name == "g" for name, _ in calls)


def _parallel_tool_calls(ask: Ask, base: Any) -> None:
    calls = _calls(ask(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                       temperature=1.0, seed=6))
    assert len(calls) == 1


COMMON = {
    "model": Case(_model), "max_tokens": Case(_max_tokens("max_tokens")), "n": Case(_n),
    "frequency_penalty": Case(_penalty("frequency_penalty")), "presence_penalty": Case(_penalty("presence_penalty")),
    "logit_bias": Case(_logit_bias), "seed": Case(_seed), "temperature": Case(_temperature), "top_p": Case(_top_p),
    "stop": Case(_stop), "stream": Case(_stream), "stream_options": Case(_stream_options),
    "user": _label("user", "end-user-42"),
}
CHAT = {
    **COMMON, "messages": Case(_messages), "max_completion_tokens": Case(_max_tokens("max_completion_tokens")),
    "logprobs": Case(_chat_logprobs), "top_logprobs": Case(_top_logprobs),
    "metadata": _label("metadata", {"order": "7"}), "safety_identifier": _label("safety_identifier", "h-1"),
    "prompt_cache_key": _label("prompt_cache_key", "k1"),
    # not applied by this node: refused
    "audio": Case(refused={"voice": "alloy", "format": "mp3"}), "function_call": Case(refused="auto"),
    "functions": Case(refused=[{"name": "f", "parameters": {"type": "object"}}]),
    "modalities": Case(refused=["text", "audio"]), "moderation": Case(refused={"model": "omni-moderation-latest"}),
    "parallel_tool_calls": Case(_parallel_tool_calls),
    "prediction": Case(refused={"type": "content", "content": "sea"}),
    "prompt_cache_options": Case(refused={"ttl": "30m"}), "prompt_cache_retention": Case(refused="24h"),
    "reasoning_effort": Case(refused="low"), "response_format": Case(_response_format),
    "service_tier": Case(refused="flex"), "store": Case(refused=True), "tool_choice": Case(_tool_choice),
    "tools": Case(_tools),
    "verbosity": Case(refused="low"), "web_search_options": Case(refused={"search_context_size": "low"}),
}
COMPLETION = {
    **COMMON, "prompt": Case(_prompt), "logprobs": Case(_completion_logprobs),
    "best_of": Case(refused=2), "echo": Case(refused=True), "suffix": Case(refused=" and so on"),
}


class Walker:
    """The base request of one endpoint on one lane, and the money checks of every answer."""

    def __init__(self, node: PaidNode, kind: str, lane: int) -> None:
        self.payer, self.kind, self.lane = Payer(node.payer_keys[0], node.base_url), kind, lane
        self.client = self.payer.openai(lane=lane, max_retries=0)
        self.model = str(node.adapter_id)

    def charged(self) -> int:
        return int(self.payer.channel(self.lane)["chargedTotal"])

    def ask(self, **fields: Any) -> Any:
        request: dict[str, Any] = {"model": self.model, "max_tokens": 8, "temperature": 0, **fields}
        before = self.charged()
        if self.kind == "chat":
            request.setdefault("messages", [{"role": "user", "content": "the sea"}])
            out = self.client.chat.completions.create(**request)
        else:
            request.setdefault("prompt", "the sea")
            out = self.client.completions.create(**request)
        out = list(out) if request.get("stream") else out
        last = out[-1] if isinstance(out, list) else out
        fee = PROMPT_PRICE * last.usage.prompt_tokens + COMPLETION_PRICE * last.usage.completion_tokens
        receipt = last.model_extra["receipt"]
        assert int(receipt["fee"]) == fee == self.charged() - before  # one receipt, for every choice
        assert receipt["completionTokens"] == last.usage.completion_tokens
        return out

    def refused(self, name: str, value: Any) -> None:
        before = self.charged()
        with pytest.raises(openai.BadRequestError) as err:
            self.ask(**{name: value})
        assert err.value.status_code == 400 and err.value.param == name, (name, err.value.body)
        assert self.charged() == before, name


@pytest.mark.parametrize(("kind", "module", "cases", "lane"), [
    ("chat", chat_create_params, CHAT, 70), ("completion", completion_create_params, COMPLETION, 71)])
def test_every_published_request_field_is_honoured_or_refused_by_name(
        paid_node: PaidNode, kind: str, module: Any, cases: dict[str, Case], lane: int) -> None:
    fields = published(module)
    assert fields - cases.keys() == set(), "OpenAI publishes fields this node has not decided on"
    walker = Walker(paid_node, kind, lane)
    base = walker.ask()
    assert base.usage.completion_tokens == 8  # the tiny model writes no end of text after "the sea"
    for name in sorted(fields):
        case = cases[name]
        if case.check is None:
            walker.refused(name, case.refused)
        else:
            case.check(walker.ask, base)
    assert text_of(walker.ask()) == text_of(base)  # no hold was left behind: the lane serves on


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_fields_nobody_published_are_refused_unless_this_node_applies_them(paid_node: PaidNode, kind: str) -> None:
    walker = Walker(paid_node, kind, 72 if kind == "chat" else 73)
    base = walker.ask()
    for name, value in {"frobnicate": 1, "top_logprob": 2, "guided_json": {"type": "object"}}.items():
        before = walker.charged()
        with pytest.raises(openai.BadRequestError) as err:
            walker.ask(extra_body={name: value})
        assert err.value.param == name and walker.charged() == before
    assert text_of(walker.ask(extra_body={"top_k": 1, "temperature": 1.0, "seed": 5})) == text_of(base)
    stop = text_of(base)[:2]
    assert text_of(walker.ask(stop=[stop])) == ""
    forced = walker.ask(stop=[stop], extra_body={"min_tokens": 8})
    assert forced.usage.completion_tokens == 8  # the stop string waits until min_tokens
    assert text_of(walker.ask(extra_body={"repetition_penalty": 10.0})) != text_of(base)
    for name, extra in {"min_tokens": {"min_tokens": 9}, "logit_bias": {"logit_bias": {"999999": 1}},
                        "repetition_penalty": {"repetition_penalty": 0.0}}.items():
        before = walker.charged()  # values the node cannot honour: refused by name, before any hold
        with pytest.raises(openai.BadRequestError) as err:
            walker.ask(extra_body=extra)
        assert err.value.param == name and walker.charged() == before


INERT = {"chat": {"response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "store": False,
                  "modalities": ["text"], "service_tier": "auto", "function_call": "none", "audio": None},
         "completion": {"best_of": 1, "echo": False, "suffix": None, "n": None}}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_field_this_node_does_not_apply_is_accepted_when_its_value_asks_for_nothing(
        paid_node: PaidNode, kind: str) -> None:
    walker = Walker(paid_node, kind, 74 if kind == "chat" else 75)
    base = walker.ask()
    for name, value in INERT[kind].items():
        assert text_of(walker.ask(extra_body={name: value})) == text_of(base), name


def _prefix_cache_hit_tokens(node: PaidNode) -> float:
    metrics = httpx.get(f"{node.base_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("loranode_engine_prefix_cache_hit_tokens_total"))


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_cache_salt_keeps_a_payers_cached_prompt_to_requests_under_it(paid_node: PaidNode, kind: str) -> None:
    """vLLM's `cache_salt`, in the official client's extra_body: a request under another salt (or none)
    finds nothing of a salted prompt cached, so its time to a first token tells nothing of it; one under
    the same salt does. It changes nothing in the answer, the quote or the fee."""
    walker = Walker(paid_node, kind, 76 if kind == "chat" else 77)
    text = f"The {kind} lamplighter climbs the tower stair and counts each step aloud until the lantern room"
    prompt = {"messages": [{"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}

    def hits_of(salt: str | None) -> tuple[float, Any]:
        before = _prefix_cache_hit_tokens(paid_node)
        out = walker.ask(**prompt, extra_body={} if salt is None else {"cache_salt": salt})
        return _prefix_cache_hit_tokens(paid_node) - before, out

    first, base = hits_of("alice-secret")
    assert first == 0
    for other in ("mallory-secret", None):
        hits, out = hits_of(other)
        assert hits == 0 and text_of(out) == text_of(base), other
    hits, out = hits_of("alice-secret")
    assert hits > 0 and text_of(out) == text_of(base) and out.usage == base.usage
    path = "chat/completions" if kind == "chat" else "completions"
    body = {"model": walker.model, "max_tokens": 8, **prompt}
    quotes = [httpx.post(f"{paid_node.base_url}/v1/quote/{path}", json=body | salt).json()
              for salt in ({}, {"cache_salt": "alice-secret"})]
    assert quotes[0] == quotes[1] and int(quotes[0]["maxFee"]) > 0
    for bad in ("", "x" * (MAX_CACHE_SALT_LENGTH + 1)):
        before = walker.charged()
        with pytest.raises(openai.BadRequestError) as err:
            walker.ask(extra_body={"cache_salt": bad})
        assert err.value.param == "cache_salt" and walker.charged() == before
