"""OpenAI request and response shapes (the subset a node serves), plus loranode's receipt field.

Requests accept the fields OpenAI clients send; anything we cannot honour (n > 1, logprobs) is refused
with a 400 naming the field rather than silently ignored. `response_format`, `tools` and `tool_choice`
are chat fields (node/api/structured.py turns them into the grammar the answer must match).
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
        for name in ("logprobs", "functions", "function_call", "best_of", "echo", "suffix", "logit_bias"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, [], {}):
                raise ValueError(f"{name} is not supported by this node")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised to a list by the validator


class CompletionRequest(_Request):
    @model_validator(mode="after")
    def _chat_only(self) -> CompletionRequest:
        for name in ("response_format", "tools", "tool_choice", "parallel_tool_calls"):
            if (self.model_extra or {}).get(name) is not None:
                raise ValueError(f"{name} is a chat field: send it to /v1/chat/completions")
        return self

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


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JSONSchemaObject = dict[str, Any]


class FunctionCall(BaseModel):
    name: FunctionName
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantTurn(_Message):
    """An earlier assistant answer: text, tool calls, or both."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # type: ignore[assignment]  # null beside tool_calls
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    """A tool's answer to one of the assistant's calls."""

    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1, max_length=128)


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: FunctionName
    description: str | None = None
    schema_: JSONSchemaObject = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    type: Literal["text", "json_object"]


class SchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | SchemaFormat, Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: str | None = None
    parameters: JSONSchemaObject = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


MAX_TOOLS = 128


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {self.tool_choice.function.name}")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice: it asks for a tool call but no tools are given")
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a JSON answer and tool calls cannot both be required; "
                             "send tool_choice none, or no response_format")
        return self

    @property
    def calls_tools(self) -> bool:
        """The answer may (or must) be tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

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
    content: str | None
    tool_calls: list[ToolCall] | None = None


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
