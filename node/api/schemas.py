"""OpenAI request and response shapes (the subset a node serves), plus loranode's receipt field.

Requests accept the fields OpenAI clients send; anything we cannot honour (n > 1, logprobs, tools)
is refused with a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 8
StopString = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unsupported(self) -> _Request:
        for name in ("logprobs", "tools", "functions", "best_of", "echo", "suffix", "logit_bias"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, [], {}):
                raise ValueError(f"{name} is not supported by this node")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised to a list by the validator


class CompletionRequest(_Request):
    # the schema states the bound on each branch: on the union, `minLength` would say nothing of a list
    prompt: str | list[int] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "integer"}, "minItems": 1}]})

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: str | list[int]) -> str | list[int]:
        if not v:
            raise ValueError("the prompt is empty")
        return v


class TextPart(BaseModel):
    """A content part: only text is served."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SignedReceipt(BaseModel):
    """The node's EIP-712 Receipt (all integers as decimal strings, hashes as 0x-hex) and its signature."""

    id: str
    voucherHash: str
    adapterId: str
    registryBlock: int
    lineageHash: str
    promptTokens: int
    completionTokens: int
    fee: str
    outputHash: str
    method: int
    signature: str
    node: str
    chargedTotal: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    receipt: SignedReceipt


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    receipt: SignedReceipt


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    details: dict[str, Any] | None = None  # the error's facts (NodeError.to_dict)


class ErrorResponse(BaseModel):
    error: ErrorBody
