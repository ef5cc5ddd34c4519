"""A request's choices in OpenAI's shapes: the body of a plain answer, the chunks of a streamed one, and
their logprobs (chat: `logprobs.content[]` of token, logprob, bytes, top_logprobs; completions:
`logprobs.tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). A request of n choices answers
them all, each with its `index`, in one body (or one stream) and under one receipt."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse

from node.api.json_response import FastJSONResponse
from node.api.structured import ChatAnswer, read_answer
from node.engine.logprob import TokenLogprob
from node.json_codec import dumps
from node.payment.service import Replay, Usage

Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]  # a token id -> its text (the token alone, decoded)


@dataclass(frozen=True)
class ChoiceOutput:
    """One choice as it is charged and answered."""

    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


class ResponseShape:
    """The JSON of one response (`base`: its id, created and model) for `kind`."""

    def __init__(self, kind: Kind, base: dict[str, Any], token_text: TokenText | None = None, *,
                 calls_tools: bool = False, call_id_prefix: str = "") -> None:
        self.kind, self.base, self.token_text = kind, base, token_text
        self.calls_tools, self.call_id_prefix = calls_tools, call_id_prefix  # tools offered: calls are read back

    # --- plain -----------------------------------------------------------------------------------
    def body(self, choices: list[ChoiceOutput], usage: Usage, receipt: dict[str, Any]) -> dict[str, Any]:
        listed = [self._choice(i, c) for i, c in enumerate(choices)]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self.base, "object": obj, "choices": listed, "usage": usage_json(usage), "receipt": receipt}

    def _choice(self, index: int, choice: ChoiceOutput) -> dict[str, Any]:
        logprobs = self.logprobs(choice.logprobs, 0)
        if self.kind == "chat":
            answer = read_answer(choice.text, self.calls_tools, f"{self.call_id_prefix}{index}")
            finish = answer.finish_reason(choice.finish_reason) if choice.finish_reason else None
            return {"index": index, "message": answer.message(), "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    # --- streamed --------------------------------------------------------------------------------
    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self.base, "object": obj, "choices": choices}

    def delta(self, index: int, text: str | dict[str, str], finish: str | None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One choice of a chunk: new text (chat: or a whole delta, e.g. the role), its logprobs' JSON."""
        if self.kind == "chat":
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def final_delta(self, choice: dict[str, Any]) -> str | dict[str, Any]:
        """What the last chunk adds to a choice of the charged body: its tool calls (and the text around
        them), which go out whole at the end; nothing when its text was streamed token by token."""
        if not self.calls_tools:
            return ""
        return _answer_of(choice).delta()

    # --- logprobs --------------------------------------------------------------------------------
    def logprobs(self, found: list[TokenLogprob] | None, text_offset: int) -> dict[str, Any] | None:
        """The JSON of these tokens' logprobs; `text_offset`: where the first one starts in the choice's text."""
        if found is None:
            return None
        assert self.token_text is not None, "a shape that writes logprobs knows its tokens' texts"
        text = self.token_text
        if self.kind == "chat":
            return {"content": [{**_top(text(lp.token_id), lp.logprob),
                                 "top_logprobs": [_top(text(t), v) for t, v in lp.top]} for lp in found],
                    "refusal": None}
        tokens = [text(lp.token_id) for lp in found]
        offsets = [text_offset]
        for token in tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in found],
                "top_logprobs": [{text(t): v for t, v in lp.top} for lp in found], "text_offset": offsets}


def _top(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def usage_json(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def replay_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored answer as a stream: each choice's text and logprobs, then one chunk with every finish
    reason, the usage and the receipt."""
    kind: Kind = "chat" if body["object"] == "chat.completion" else "completion"
    shape = ResponseShape(kind, {"id": body["id"], "created": body["created"], "model": body["model"]})
    choices = body["choices"]
    chunks = [shape.chunk([shape.delta(c["index"], _answer_of(c).delta() if kind == "chat" else c["text"],
                                       None, c.get("logprobs"))]) for c in choices]
    last = shape.chunk([shape.delta(c["index"], "", c["finish_reason"]) for c in choices])
    last.update(usage=body["usage"], receipt=body["receipt"])
    return [*chunks, last]


def _answer_of(choice: dict[str, Any]) -> ChatAnswer:
    message = choice["message"]
    return ChatAnswer(message.get("content"), message.get("tool_calls") or [])


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


def replay_response(replay: Replay, stream: bool) -> JSONResponse | StreamingResponse:
    """A stored answer again, free, in the shape it was bought in (no body is served by both endpoints:
    each refuses the other's fields), with its scheme's headers (x402: PAYMENT-RESPONSE)."""
    body = replay.body
    headers = {"X-Charged-Total": body["receipt"]["chargedTotal"], "X-Idempotent-Replay": "true", **replay.headers}
    if not stream:
        return FastJSONResponse(body, headers=headers)

    async def events() -> AsyncIterator[bytes]:
        for chunk in replay_chunks(body):
            yield event(chunk)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
